"""A cloud server in its own process (``hybridexit serve``), for the demo, the benchmark and the tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque

from ..errors import HybridExitError

_READY = re.compile(r"ready at (https?://\S+)")


class ServerStartError(HybridExitError):
    """The server process exited or did not become ready."""


class ServerProcess:
    """``python -m hybridexit.cli serve CHECKPOINT --port 0 ARGS...``; ``url`` once it printed its ready line.

    Use as a context manager: the process is stopped (SIGTERM, then SIGKILL) on exit, also on error."""

    def __init__(self, checkpoint, args: list[str] = (), env: dict | None = None, timeout_s: float = 120.0):
        cmd = [sys.executable, "-m", "hybridexit.cli", "serve", str(checkpoint), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.url: str | None = None
        self.stderr_tail: deque[str] = deque(maxlen=20)
        ready = threading.Event()

        def read_stdout():
            for line in self.proc.stdout:
                m = _READY.search(line)
                if m and not ready.is_set():
                    self.url = m.group(1)
                    ready.set()

        def read_stderr():
            for line in self.proc.stderr:
                self.stderr_tail.append(line.rstrip())

        threading.Thread(target=read_stdout, daemon=True).start()
        threading.Thread(target=read_stderr, daemon=True).start()
        t_end = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the stderr reader catch the last lines
                raise ServerStartError(f"the cloud server exited with code {self.proc.returncode}: "
                                       f"{self._reason()}")
            if time.monotonic() > t_end:
                self.stop()
                raise ServerStartError(f"the cloud server did not become ready within {timeout_s:.0f} s: "
                                       f"{self._reason()}")

    def _reason(self) -> str:
        lines = [ln for ln in self.stderr_tail if ln.strip()]
        return lines[-1] if lines else "no message"

    def kill(self) -> None:
        """SIGKILL, no clean-up: a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
