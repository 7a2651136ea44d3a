"""The link shaper (runtime/shaper.py): over real loopback sockets, its measured rate and delay match the trace
within 10 %, outages carry nothing, loss delays but never corrupts, bad traces are refused in one line."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest

from hybridexit.runtime.shaper import Shaper, Trace, TraceError


class _Upstream:
    """A loopback server: echoes (mode "echo"), swallows and timestamps (mode "sink") or sends ``nbytes``
    (mode "source") on each connection."""

    def __init__(self, mode: str, nbytes: int = 0):
        self.mode, self.nbytes = mode, nbytes
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.arrivals: list[tuple[float, int]] = []
        self.data = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            if self.mode == "source":
                conn.recv(1)
                conn.sendall(b"\x07" * self.nbytes)
                return
            while True:
                b = conn.recv(65536)
                if not b:
                    return
                if self.mode == "echo":
                    conn.sendall(b)
                else:
                    self.arrivals.append((time.monotonic(), len(b)))
                    self.data += b

    def close(self):
        self.sock.close()


def _trace(rows, loss=False):
    cols = list(zip(*rows))
    if not loss:
        cols.append((0.0,) * len(rows))
    return Trace(*cols)


def _rate_mbps(arrivals, t_from=None, t_to=None):
    """Measured rate over the arrivals (after the first one, whose bits arrived before its timestamp)."""
    pts = [(t, n) for t, n in arrivals if (t_from is None or t >= t_from) and (t_to is None or t <= t_to)]
    (t0, _), (t1, _) = pts[0], pts[-1]
    return sum(n for _, n in pts[1:]) * 8 / (t1 - t0) / 1e6


def _connect(port):
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def test_round_trip_matches_trace():
    up = _Upstream("echo")
    with Shaper(_trace([(0, 50, 50, 80)]), ("127.0.0.1", up.port)) as s, _connect(s.port) as c:
        rtts = []
        for _ in range(6):
            t = time.monotonic()
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            rtts.append((time.monotonic() - t) * 1000)
    up.close()
    assert statistics.median(rtts) == pytest.approx(80, rel=0.10)


def test_uplink_and_downlink_rates_match_trace():
    sink = _Upstream("sink")
    with Shaper(_trace([(0, 8, 4, 20)]), ("127.0.0.1", sink.port)) as s, _connect(s.port) as c:
        c.sendall(b"\x01" * 600_000)  # 0.6 s at 8 Mbit/s
        deadline = time.monotonic() + 5
        while len(sink.data) < 600_000 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert bytes(sink.data) == b"\x01" * 600_000
    assert _rate_mbps(sink.arrivals) == pytest.approx(8, rel=0.10)
    sink.close()

    src = _Upstream("source", 300_000)  # 0.6 s at 4 Mbit/s
    with Shaper(_trace([(0, 8, 4, 20)]), ("127.0.0.1", src.port)) as s, _connect(s.port) as c:
        c.sendall(b"g")
        arrivals, got = [], 0
        while got < 300_000:
            b = c.recv(65536)
            assert b
            arrivals.append((time.monotonic(), len(b)))
            got += len(b)
    src.close()
    assert _rate_mbps(arrivals) == pytest.approx(4, rel=0.10)


def test_rate_follows_the_rows_and_an_outage_carries_nothing():
    # 0-0.5 s: 8 Mbit/s; 0.5-1.0 s: outage; 1.0-1.5 s: 2 Mbit/s (then it loops)
    sink = _Upstream("sink")
    tr = _trace([(0, 8, 8, 10), (0.5, 0, 8, 10), (1.0, 2, 8, 10)])
    with Shaper(tr, ("127.0.0.1", sink.port), clock_start="start") as s, _connect(s.port) as c:
        t0 = s.proxy.t0
        c.sendall(b"\x02" * 700_000)  # more than the first 1.5 s carry (0.5 MB + 0.125 MB)
        time.sleep(1.45)
    sink.close()
    rel = [(t - t0, n) for t, n in sink.arrivals]
    assert _rate_mbps(rel, 0.05, 0.5) == pytest.approx(8, rel=0.10)
    in_outage = sum(n for t, n in rel if 0.52 <= t <= 1.0)  # 0.5 s + the 5 ms one-way delay
    assert in_outage == 0
    assert _rate_mbps(rel, 1.05, 1.45) == pytest.approx(2, rel=0.10)


def test_loss_delays_segments_but_keeps_the_stream_intact():
    sink = _Upstream("sink")
    payload = bytes(range(256)) * 400  # ~71 segments
    tr = _trace([(0, 100, 100, 10, 0.2)], loss=True)
    with Shaper(tr, ("127.0.0.1", sink.port), seed=3) as s, _connect(s.port) as c:
        t = time.monotonic()
        c.sendall(payload)
        while len(sink.data) < len(payload) and time.monotonic() - t < 10:
            time.sleep(0.005)
        took = time.monotonic() - t
    sink.close()
    assert bytes(sink.data) == payload
    # 102 KB at 100 Mbit/s is 8 ms; with ~14 of 71 segments lost, at least one 200 ms timeout shows
    assert took > 0.2


def test_trace_files_round_trip_and_bad_ones_are_refused(tmp_path):
    tr = _trace([(0, 8, 4, 20, 0.01), (1, 0, 0.5, 300, 0.0)], loss=True)
    p = tmp_path / "t.csv"
    tr.write(p)
    back = Trace.read(p)
    assert back.up_mbps == (8, 0) and back.loss == (0.01, 0.0) and back.duration == 2
    assert back.at(2.5)["rtt_ms"] == 20 and back.at(1.2)["up_mbps"] == 0
    (tmp_path / "noloss.csv").write_text("t_s,up_mbps,down_mbps,rtt_ms\n0,1,2,30\n")
    assert Trace.read(tmp_path / "noloss.csv").loss == (0.0,)
    bad = {
        "a,b,c\n0,1,2\n": "header",
        "t_s,up_mbps,down_mbps,rtt_ms\n1,1,1,1\n": "t_s = 0",
        "t_s,up_mbps,down_mbps,rtt_ms\n0,1,1,1\n0,1,1,1\n": "increase",
        "t_s,up_mbps,down_mbps,rtt_ms\n0,-1,1,1\n": ">= 0",
        "t_s,up_mbps,down_mbps,rtt_ms\n0,0,1,1\n": "rate above 0",
        "t_s,up_mbps,down_mbps,rtt_ms,loss\n0,1,1,1,1.5\n": "probability",
        "t_s,up_mbps,down_mbps,rtt_ms\n0,x,1,1\n": "numbers",
    }
    for text, why in bad.items():
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(TraceError, match=why):
            Trace.read(tmp_path / "bad.csv")
    with pytest.raises(TraceError, match="cannot read"):
        Trace.read(tmp_path / "missing.csv")


def test_committed_traces_are_the_script_output(tmp_path):
    """benchmarks/traces/*.csv are what make_traces.py writes (seeded), and each replays."""
    import importlib.util
    import random
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "traces"
    spec = importlib.util.spec_from_file_location("make_traces", root / "make_traces.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for i, (name, make) in enumerate(mod.TRACES.items()):
        make(random.Random(mod.SEED + i)).write(tmp_path / f"{name}.csv")
        assert (tmp_path / f"{name}.csv").read_text() == (root / f"{name}.csv").read_text(), name
    outage = Trace.read(root / "outage_30s.csv")
    assert sum(u == 0 for u in outage.up_mbps) == 30
