"""Thread counts that hold up when the edge and the cloud share a machine (issue 35, item 4): ``serve`` and
``edge`` default to half the cores available, say so in --help, and count the cores this process may use."""

import os
import subprocess
import sys

import pytest
from conftest import write_tiny_checkpoint

from hybridexit.cli import build_parser
from hybridexit.threads import cores_available, runtime_threads


def test_half_the_cores_at_least_one():
    assert [runtime_threads(c) for c in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]
    assert runtime_threads() == max(1, cores_available() // 2)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_cores_available_follow_the_affinity_mask():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from hybridexit.threads import cores_available, runtime_threads; print(cores_available(), runtime_threads())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["1", "1"], r.stderr


@pytest.mark.parametrize("cmd", ["serve", "edge"])
def test_serve_and_edge_default_to_half_the_cores_and_say_so(cmd, tmp_path):
    ck = write_tiny_checkpoint(tmp_path / "ck")
    argv = [cmd, str(ck)] + (["--cloud", "http://127.0.0.1:8000"] if cmd == "edge" else [])
    a = build_parser().parse_args(argv)
    assert a.threads == runtime_threads()  # not None: torch's default (every core) is never left to apply
    sub = next(x for x in build_parser()._actions if x.dest == "cmd").choices[cmd]
    text = " ".join(sub.format_help().split())
    assert f"(default: {runtime_threads()}, half of the {cores_available()} cores available here" in text
