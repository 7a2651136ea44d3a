"""A link shaper for tests and benchmarks: a TCP proxy on loopback that replays a network trace.

A trace is a CSV file with the header ``t_s,up_mbps,down_mbps,rtt_ms[,loss]``: from ``t_s`` (seconds, increasing,
the first 0) until the next row, the uplink (client -> upstream) carries ``up_mbps`` Mbit/s, the downlink
``down_mbps``, the round trip adds ``rtt_ms`` and a TCP segment is lost with probability ``loss`` (default 0). The
last row lasts as long as the step before it; the trace then starts again (it loops). A rate of 0 is an outage:
bytes wait in the link until the rate comes back (a request then times out on the client's own clock).

How a byte crosses the shaper (each direction is one shared link, like a radio, whatever the connections):
- **rate**: the data read from one side is cut into segments of at most ``MSS`` bytes; each segment occupies the
  link from ``max(now, link free)`` for ``bits / rate`` seconds, the rate integrated over the trace rows it spans;
- **delay**: it is delivered ``rtt_ms / 2`` (read at the end of its transmission) after that, in order;
- **loss**: a lost segment is delivered after a retransmission timeout on top, ``max(200 ms, 2 x rtt)`` (the
  TCP minimum RTO, or two round trips); later segments of the same connection wait behind it (TCP is in order).
  Loss is drawn from a seeded generator: a run is reproducible given the same traffic.

``speed`` compresses time: trace second ``t`` plays at wall second ``t / speed``; rates and delays are not scaled.
The trace clock starts at the first accepted connection (``clock_start="connection"``) or when the proxy starts.

``Shaper`` runs the proxy in a thread of this process (tests); ``ShaperProcess`` in a child process (benchmarks:
the edge's own computation then does not delay the link's clock).
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import math
import multiprocessing as mp
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

MSS = 1448  # bytes of TCP payload per segment (Ethernet MTU 1500 - IP 20 - TCP 20 - timestamps 12)
MIN_RTO_S = 0.2
READ_BYTES = 65536
COLUMNS = ("t_s", "up_mbps", "down_mbps", "rtt_ms")


class TraceError(ConfigError):
    """A trace file that cannot be replayed (format, values)."""


@dataclass(frozen=True)
class Trace:
    """A piecewise-constant link: row i holds from ``t[i]`` to ``t[i + 1]`` (the last row for ``step``)."""

    t: tuple[float, ...]
    up_mbps: tuple[float, ...]
    down_mbps: tuple[float, ...]
    rtt_ms: tuple[float, ...]
    loss: tuple[float, ...]
    name: str = "trace"

    def __post_init__(self):
        n = len(self.t)
        if n == 0:
            raise TraceError(f"{self.name}: a trace needs at least one row")
        if any(len(c) != n for c in (self.up_mbps, self.down_mbps, self.rtt_ms, self.loss)):
            raise TraceError(f"{self.name}: every column needs one value per row")
        if self.t[0] != 0:
            raise TraceError(f"{self.name}: the first row must start at t_s = 0 (got {self.t[0]})")
        if any(b <= a for a, b in zip(self.t, self.t[1:])):
            raise TraceError(f"{self.name}: t_s must increase strictly from row to row")
        for col, vals in (("up_mbps", self.up_mbps), ("down_mbps", self.down_mbps), ("rtt_ms", self.rtt_ms)):
            if any(not (v >= 0 and math.isfinite(v)) for v in vals):
                raise TraceError(f"{self.name}: {col} must be finite and >= 0 in every row")
        if any(not 0 <= v < 1 for v in self.loss):
            raise TraceError(f"{self.name}: loss is a probability in [0, 1)")
        if max(self.up_mbps) <= 0 or max(self.down_mbps) <= 0:
            raise TraceError(f"{self.name}: each direction needs a row with a rate above 0 (all zero: the link "
                             f"never carries a byte)")

    @property
    def step(self) -> float:
        return self.t[-1] - self.t[-2] if len(self.t) > 1 else 1.0

    @property
    def duration(self) -> float:
        return self.t[-1] + self.step

    def row(self, ts: float) -> int:
        """The row in force at trace time ``ts`` (looping)."""
        return bisect.bisect_right(self.t, ts % self.duration) - 1

    def at(self, ts: float) -> dict:
        i = self.row(ts)
        return {"up_mbps": self.up_mbps[i], "down_mbps": self.down_mbps[i], "rtt_ms": self.rtt_ms[i],
                "loss": self.loss[i]}

    @classmethod
    def read(cls, path) -> Trace:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise TraceError(f"cannot read trace {p}: {e.strerror or e}") from None
        rows = list(csv.reader(line for line in text.splitlines() if line.strip() and not line.startswith("#")))
        if not rows or tuple(c.strip() for c in rows[0][:4]) != COLUMNS:
            raise TraceError(f"{p}: the first line must be the header {','.join(COLUMNS)}[,loss]")
        has_loss = len(rows[0]) > 4 and rows[0][4].strip() == "loss"
        cols: list[list[float]] = [[], [], [], [], []]
        for k, r in enumerate(rows[1:], start=2):
            if len(r) != (5 if has_loss else 4):
                raise TraceError(f"{p} row {k}: {len(r)} values, the header has {5 if has_loss else 4}")
            try:
                vals = [float(v) for v in r]
            except ValueError:
                raise TraceError(f"{p} row {k}: {r} are not all numbers") from None
            for c, v in zip(cols, vals + ([] if has_loss else [0.0])):
                c.append(v)
        return cls(*map(tuple, cols), name=p.stem)

    def write(self, path) -> None:
        lines = [",".join((*COLUMNS, "loss"))]
        for row in zip(self.t, self.up_mbps, self.down_mbps, self.rtt_ms, self.loss):
            lines.append(",".join(f"{v:g}" for v in row))
        Path(path).write_text("\n".join(lines) + "\n")


class _Link:
    """One direction of the link: when each segment finishes its transmission, shared by every connection."""

    def __init__(self, trace: Trace, rates: tuple[float, ...], speed: float, rng: random.Random):
        self.trace, self.speed, self.rng = trace, speed, rng
        self.bps = [r * 1e6 for r in rates]
        self.free_at = 0.0  # wall seconds since the clock started
        self.lock = threading.Lock()

    def _row_bounds(self, w: float) -> tuple[int, float]:
        """Row in force at wall time ``w`` (since the clock started) and the wall time it ends."""
        tr = self.trace
        ts = w * self.speed
        loops, pos = divmod(ts, tr.duration)
        i = bisect.bisect_right(tr.t, pos) - 1
        end = tr.t[i + 1] if i + 1 < len(tr.t) else tr.duration
        return i, (loops * tr.duration + end) / self.speed

    def send(self, nbytes: int, now: float) -> tuple[float, int]:
        """(wall time the segment's last bit leaves, row then in force)."""
        with self.lock:
            w = max(now, self.free_at)
            bits = nbytes * 8.0
            while True:
                i, end = self._row_bounds(w)
                end = max(end, w + 1e-9)
                rate = self.bps[i]
                if rate > 0 and bits <= rate * (end - w):
                    w += bits / rate
                    break
                bits -= rate * (end - w)
                w = end
            self.free_at = w
            return w, self.trace.row(w * self.speed)

    def delay_s(self, row: int) -> float:
        """One-way delay of a segment, plus a retransmission timeout when it is lost."""
        rtt = self.trace.rtt_ms[row] / 1000.0
        d = rtt / 2
        if self.trace.loss[row] > 0 and self.rng.random() < self.trace.loss[row]:
            d += max(MIN_RTO_S, 2 * rtt)
        return d


class _Proxy:
    """The asyncio side: accept, connect upstream, pump both directions through their links."""

    def __init__(self, trace: Trace, upstream: tuple[str, int], speed: float, seed: int, clock_start: str):
        if speed <= 0:
            raise ConfigError(f"speed={speed}: must be > 0 (2 plays the trace twice as fast)")
        if clock_start not in ("connection", "start"):
            raise ConfigError(f"clock_start={clock_start!r}: use 'connection' or 'start'")
        rng = random.Random(seed)
        self.trace, self.upstream, self.clock_start = trace, upstream, clock_start
        self.up = _Link(trace, trace.up_mbps, speed, rng)
        self.down = _Link(trace, trace.down_mbps, speed, rng)
        self.t0: float | None = None
        self.connections = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def _pump(self, reader, writer, link: _Link):
        q: asyncio.Queue = asyncio.Queue()
        writer_task = asyncio.ensure_future(self._deliver(q, writer))
        last = 0.0
        try:
            while True:
                data = await reader.read(READ_BYTES)
                if not data:
                    break
                for s in range(0, len(data), MSS):
                    seg = data[s:s + MSS]
                    done, row = link.send(len(seg), self.now())
                    last = max(last, done + link.delay_s(row))
                    q.put_nowait((last, seg))
        except (ConnectionError, OSError):
            pass
        q.put_nowait((last, None))
        await writer_task

    async def _deliver(self, q: asyncio.Queue, writer):
        try:
            while True:
                at, seg = await q.get()
                wait = at - self.now()
                if wait > 0:
                    await asyncio.sleep(wait)
                if seg is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    break
                writer.write(seg)
                while not q.empty() and q._queue[0][1] is not None and q._queue[0][0] <= self.now():  # due now
                    writer.write(q.get_nowait()[1])
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(self, creader, cwriter):
        if self.t0 is None:
            self.t0 = time.monotonic()
        self.connections += 1
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(self._pump(creader, uwriter, self.up), self._pump(ureader, cwriter, self.down))


class Shaper:
    """The proxy in a background thread of this process: ``with Shaper(trace, ("127.0.0.1", 8000)) as s:``
    then connect to ``s.port`` (or ``s.url``)."""

    def __init__(self, trace: Trace | str | Path, upstream: tuple[str, int], speed: float = 1.0, seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0, clock_start: str = "connection"):
        self.trace = trace if isinstance(trace, Trace) else Trace.read(trace)
        self.proxy = _Proxy(self.trace, upstream, speed, seed, clock_start)
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self):
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            server = loop.run_until_complete(asyncio.start_server(self.proxy.handle, self.host, self.port))
        except OSError as e:
            self._error = e
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        if self.proxy.clock_start == "start":
            self.proxy.t0 = time.monotonic()
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def start(self) -> Shaper:
        self._thread = threading.Thread(target=self._run, name="shaper", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise ConfigError(f"the shaper cannot listen on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self):
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _child(trace: str, upstream, speed, seed, host, clock_start, conn):
    s = Shaper(trace, tuple(upstream), speed, seed, host, 0, clock_start)
    try:
        s.start()
    except ConfigError as e:
        conn.send(("error", str(e)))
        return
    conn.send(("port", s.port))
    conn.recv()  # any message, or the parent's end closing: stop
    s.stop()


class ShaperProcess:
    """The proxy in a child process (spawned, its own interpreter): ``with ShaperProcess(path, upstream) as s``."""

    def __init__(self, trace: str | Path, upstream: tuple[str, int], speed: float = 1.0, seed: int = 0,
                 host: str = "127.0.0.1", clock_start: str = "connection"):
        Trace.read(trace)  # a bad trace fails here, in one line
        self.args = (str(trace), list(upstream), speed, seed, host, clock_start)
        self.host, self.port = host, 0
        self._proc = None
        self._conn = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ShaperProcess:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(*self.args, child), daemon=True)
        self._proc.start()
        if not self._conn.poll(60):
            self.stop()
            raise ConfigError("the shaper process did not start within 60 s")
        kind, value = self._conn.recv()
        if kind == "error":
            self.stop()
            raise ConfigError(value)
        self.port = value
        return self

    def stop(self):
        if self._conn is not None:
            try:
                self._conn.send("stop")
            except (OSError, BrokenPipeError):
                pass
        if self._proc is not None:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
