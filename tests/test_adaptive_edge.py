"""The adaptive edge end to end (runtime/adaptive_edge.py): over the link shaper to a real server, it sends where
the link allows and the plan is cheaper, answers locally where the link is too slow, and answers locally with
``degraded`` when the cloud is gone; every answer is the whole network's (or an exit's), within the target."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import write_tiny_checkpoint
from test_runtime import ThreadServer

from hybridexit.data import Inputs
from hybridexit.model.checkpoint import fingerprint, load_model
from hybridexit.runtime.adaptive_edge import AdaptiveEdge, AdaptiveOptions, codec_specs, run_adaptive_edge
from hybridexit.runtime.client import EdgeOptions
from hybridexit.runtime.server import ServerSettings
from hybridexit.runtime.shaper import Shaper, Trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

SLO = 150.0


def _images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _trace(up_mbps, rtt_ms):
    return Trace((0.0,), (up_mbps,), (up_mbps,), (rtt_ms,), (0.0,))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # untrained: no input exits at threshold 0.5 (entropies near ln 10), every one needs the rest of the network
    return write_tiny_checkpoint(tmp_path_factory.mktemp("adaptive") / "ck", exits=(2,), thresholds=(0.5,))


def _edge(ckpt, url, **kw):
    model, meta = load_model(ckpt)
    # computation priced at a (made-up) 50 W and a free radio: sending features costs less than finishing locally
    ad = AdaptiveOptions(slo_ms=SLO, codecs=("int8+zstd", "fp16"), boundaries="all", edge_watts=50.0, uj_per_bit=0.0,
                         calibration_images=16, timing_reps=3, probe_interval_s=0.1, **kw)
    opts = EdgeOptions(url, engine="torch", timeout_s=5.0)
    return AdaptiveEdge(model, meta["policy"], fingerprint(ckpt), opts, ad, codec_specs(ad.codecs, ckpt),
                        _images(16, 9))


def _until_probed(edge, n=2):
    """The background probe has measured the link ``n`` times (it never holds up an input, so wait for it here)."""
    t_end = time.monotonic() + 10
    while edge.estimate.samples < n:
        assert time.monotonic() < t_end, "no probe answered"
        time.sleep(0.01)


def _whole(ckpt, x):
    model, _ = load_model(ckpt)
    with torch.no_grad():
        return model.eval()(x)[-1].argmax(1).tolist()


def test_good_link_offloads_slow_link_stays_local(ckpt):
    x = _images(12)
    want = _whole(ckpt, x)
    srv = ThreadServer(ckpt, ServerSettings(max_wait_ms=0))
    try:
        host, port = srv.url.split("://")[1].split(":")
        for trace, route in ((_trace(50.0, 10.0), "cloud"), (_trace(0.02, 10.0), "local")):
            with Shaper(trace, (host, int(port))) as sh:
                edge = _edge(ckpt, sh.url)
                assert edge.link_matters
                with edge:
                    _until_probed(edge)
                    recs = [edge.run_one(x[i:i + 1], 0, i) for i in range(len(x))]
            assert [r["prediction"] for r in recs] == want
            assert all(r["latency_ms"] <= SLO for r in recs)
            assert not any(r["degraded"] for r in recs)
            settled = recs[2:]  # the estimate knows the link
            assert all(r["decided_at"] == route for r in settled), [r["plan"] for r in settled]
            if route == "cloud":  # the boundary the plan named reached the server: it answered from there
                assert all(r["handoff"] < edge.n and r["payload_bytes"] > 0 for r in settled)
    finally:
        srv.stop()


def test_unreachable_cloud_gives_degraded_local_answers_within_the_target(ckpt, tmp_path):
    x = _images(10, 3)
    want = _whole(ckpt, x)
    srv = ThreadServer(ckpt, ServerSettings(max_wait_ms=0))
    host, port = srv.url.split("://")[1].split(":")
    with Shaper(_trace(50.0, 10.0), (host, int(port))) as sh:
        edge = _edge(ckpt, sh.url)
        with edge:
            _until_probed(edge)
            before = [edge.run_one(x[i:i + 1], 0, i) for i in range(5)]
            srv.stop()
            after = [edge.run_one(x[i:i + 1], 0, i) for i in range(5, 10)]
    assert before[-1]["decided_at"] == "cloud"
    assert [r["prediction"] for r in before + after] == want
    assert all(r["decided_at"] == "local" and r["degraded"] for r in after)
    assert all(r["latency_ms"] <= SLO for r in after)


def test_run_adaptive_edge_streams_one_record_per_input(ckpt, tmp_path):
    x = _images(6, 5)
    srv = ThreadServer(ckpt, ServerSettings(max_wait_ms=0))
    try:
        out = tmp_path / "r.jsonl"
        opts = EdgeOptions(srv.url, engine="torch")
        ad = AdaptiveOptions(slo_ms=SLO, codecs=("int8",), calibration_images=8, timing_reps=3)
        s, recs = run_adaptive_edge(ckpt, Inputs(x, torch.arange(6) % 10), opts, ad, _images(8), out=out)
    finally:
        srv.stop()
    assert [r["index"] for r in recs] == list(range(6)) and len(out.read_text().splitlines()) == 6
    assert s["inputs"] == 6 and s["within_slo"] == 1.0 and s["plans_available"]
    # priced by the energy model, finishing locally is cheaper than any radio: the link is never probed
    assert s["probes"] == 0 and set(s["routes"]) <= {"local", "exit:0"}
