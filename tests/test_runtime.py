"""The edge-cloud runtime over a real loopback network: wire format, cloud server, edge client, faults.

Servers are real uvicorn servers (in a thread, or in their own process where the test kills them); the model is
a tiny random-init ResNet-8 hybrid checkpoint written with ``save_model``.
"""

import json
import math
import struct
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import zstandard

from hybridexit.cli import main
from hybridexit.data import Inputs, Split
from hybridexit.model.checkpoint import fingerprint, load_model, save_model
from hybridexit.model.hybrid import HybridNet
from hybridexit.model.policy import ExitPolicy, read_policy, write_policy
from hybridexit.model.resnet import HybridConfig
from hybridexit.runtime import wire
from hybridexit.runtime.client import EdgeOptions, EdgeRunner, run_edge
from hybridexit.runtime.process import ServerProcess
from hybridexit.runtime.server import CloudModel, ServerSettings, bind_socket, make_server, url_of
from hybridexit.runtime.transport import CloudClient, CloudRejected, CloudUnavailable
from hybridexit.workflows.evaluate import evaluate_conditional

TOKEN = "test-token-0123456789"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
MAX_BODY = 256 * 1024  # 7 samples of 32x16x16 float32 features
N_IMAGES = 48


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return Split(torch.randint(0, 256, (N_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (N_IMAGES,), generator=g), "test")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, images):
    """ResNet-8, 4 binary edge layers, exits at layers 2 and 4; thresholds set so that about a third of the
    inputs stop at each exit and a third go to the cloud."""
    torch.manual_seed(0)
    cfg = HybridConfig(depth=8, num_classes=10, edge_layers=4, edge_bits=1, exits=(2, 4), mean=MEAN, std=STD)
    model = HybridNet(cfg)
    with torch.no_grad():
        model.train()
        for _ in range(3):  # non-trivial BatchNorm statistics
            model(torch.randn(32, 3, 32, 32))
        for lin in [h.fc for h in model.exits.values()] + [model.head.fc]:
            lin.weight.normal_(0, 1.0)  # spread the entropies and logits (no near-ties)
        model.eval()
        outs = model(images.images)
    from hybridexit.model.exits import entropy

    e0, e1 = entropy(outs[0]), entropy(outs[1])
    t0 = float(e0.quantile(0.33))
    t1 = float(e1[e0 >= t0].quantile(0.5))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(path, model, {"data": {"name": "cifar10", "mean": list(MEAN), "std": list(STD),
                                      "classes": [f"class{i}" for i in range(10)]}})
    write_policy(path, ExitPolicy((t0, t1)))
    return path


@pytest.fixture(scope="module")
def reference(ckpt, images):
    model, _ = load_model(ckpt)
    return [d.to_json() for d in evaluate_conditional(model, images, read_policy(ckpt).thresholds, batch_size=500)]


class ThreadServer:
    """A real uvicorn server on a loopback port, in a thread of this process; HTTPS with ``tls`` = (cert, key)."""

    def __init__(self, checkpoint, settings: ServerSettings, tls: tuple[str, str] | None = None):
        self.model = CloudModel.from_checkpoint(checkpoint, "cpu")
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = url_of(self.sock, tls is not None)
        cert, key = tls or (None, None)
        self.server = make_server(self.model, settings, self.sock, tls_cert=cert, tls_key=key)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t_end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < t_end and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="module")
def server(ckpt):
    s = ThreadServer(ckpt, ServerSettings(max_batch=16, max_wait_ms=5, max_request_bytes=MAX_BODY,
                                          request_timeout_s=20, token=TOKEN))
    yield s
    s.stop()


def features(ckpt, images, n=2):
    model, _ = load_model(ckpt)
    edge, cloud = model.split()
    with torch.no_grad():
        f = edge(images.images[:n])
        return f, cloud(f)


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------------------------------- wire format
@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("compress", [False, True])
def test_wire_round_trip(codec, compress):
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-3, 2, 8).view(1, 8, 1, 1)  # channels of very different magnitudes
    x = torch.randn(3, 8, 5, 5, generator=g) * scale
    x[1, 2] = 0.0  # an all-zero channel (int8 scale 0)
    fp = "0123456789abcdef"
    body = wire.encode(x, fp, codec, compress)
    h = wire.parse_header(body)
    assert (h.codec, h.compressed, h.fingerprint, h.shape) == (codec, compress, fp, (3, 8, 5, 5))
    assert h.dtype == {"fp32": "float32", "fp16": "float16", "int8": "int8"}[codec]
    if not compress:
        assert len(body) == wire.frame_bytes(x.shape, codec)
    y = wire.decode(body, fp, (None, 8, 5, 5))
    assert y.dtype == torch.float32 and y.shape == x.shape
    if codec == "fp32":
        assert torch.equal(x, y)
    elif codec == "fp16":
        torch.testing.assert_close(y, x.half().float(), rtol=0, atol=0)
    else:  # at most half a quantization step per (sample, channel)
        step = x.abs().amax(dim=(2, 3), keepdim=True) / 127
        assert bool(((y - x).abs() <= step / 2 + 1e-6 * step + 1e-30).all())
        assert torch.equal(y[1, 2], torch.zeros(5, 5))


def test_wire_sizes_shrink_with_codec():
    x = torch.randn(1, 32, 16, 16)
    sizes = {c: len(wire.encode(x, "0" * 16, c)) for c in wire.CODECS}
    assert sizes["fp32"] == 32 + 16 + 32 * 16 * 16 * 4
    assert sizes["fp16"] == 32 + 16 + 32 * 16 * 16 * 2
    assert sizes["int8"] == 32 + 16 + 32 * 16 * 16 + 32 * 4
    sparse = torch.relu(torch.randn(1, 32, 16, 16) - 1.5)  # mostly zeros: zstd must help
    assert len(wire.encode(sparse, "0" * 16, "fp32", compress=True)) < len(wire.encode(sparse, "0" * 16, "fp32")) / 2


def _patch(body: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(body)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _bad_frames():
    x = torch.randn(2, 4, 3, 3)
    good = wire.encode(x, "0123456789abcdef")
    big = np.zeros(2 * 4 * 3 * 3 * 4 * 100, dtype=np.uint8).tobytes()  # decompresses past the shape's size
    zbig = zstandard.ZstdCompressor().compress(big)
    head = bytearray(good[:wire.HEADER_BYTES + 16])
    head[7] = 1  # zstd flag
    struct.pack_into("<I", head, 28, len(zbig))
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    i8 = bytearray(wire.encode(x, "0123456789abcdef", "int8"))
    i8[-1] = 0x80  # -128
    return {
        "empty": (b"", wire.TruncatedFrame),
        "short header": (good[:20], wire.TruncatedFrame),
        "cut in shape": (good[:wire.HEADER_BYTES + 5], wire.TruncatedFrame),
        "cut in payload": (good[:-7], wire.TruncatedFrame),
        "trailing bytes": (good + b"\0", wire.CorruptPayload),
        "garbage": (bytes(range(256)) * 3, wire.BadMagic),
        "json": (b'{"features": [0.1, 0.2]}', wire.BadMagic),
        "version": (_patch(good, 4, "<H", 2), wire.UnsupportedVersion),
        "codec": (_patch(good, 6, "<B", 9), wire.UnknownCodec),
        "flags": (_patch(good, 7, "<B", 4), wire.WireError),
        "fingerprint chars": (_patch(good, 8, "<16s", b"ZZZZZZZZZZZZZZZZ"), wire.WireError),
        "dtype mismatch": (_patch(good, 24, "<B", 2), wire.WrongDtype),
        "dtype unknown": (_patch(good, 24, "<B", 77), wire.WrongDtype),
        "ndim 0": (_patch(good, 25, "<B", 0), wire.WrongShape),
        "zero dim": (_patch(good, 32, "<I", 0), wire.WrongShape),
        "not zstd": (_patch(good, 7, "<B", 1), wire.CorruptPayload),
        "zstd bomb": (bytes(head) + zbig, wire.CorruptPayload),
        "nan": (wire.encode(nan, "0123456789abcdef"), wire.CorruptPayload),
        "int8 -128": (bytes(i8), wire.CorruptPayload),
    }


@pytest.mark.parametrize("name", list(_bad_frames()))
def test_wire_refuses_malformed_frames(name):
    body, err = _bad_frames()[name]
    with pytest.raises(err) as e:
        wire.decode(body, "0123456789abcdef", (None, 4, 3, 3))
    assert type(e.value) is err and e.value.code == err.code  # the exact error and the code the server answers
    assert str(e.value)  # says what was wrong


def test_wire_checks_fingerprint_shape_and_size():
    body = wire.encode(torch.randn(2, 4, 3, 3), "0123456789abcdef")
    with pytest.raises(wire.FingerprintMismatch, match="same checkpoint"):
        wire.decode(body, "fedcba9876543210")
    with pytest.raises(wire.WrongShape, match=r"\(N, 4, 3, 4\)"):
        wire.decode(body, shape=(None, 4, 3, 4))
    with pytest.raises(wire.FrameTooLarge):
        wire.decode(body, max_decoded_bytes=100)
    with pytest.raises(wire.UnknownCodec):
        wire.encode(torch.zeros(1, 2), "0123456789abcdef", "bf16")


def test_fingerprint_ignores_exit_policy(ckpt, tmp_path):
    model, meta = load_model(ckpt)
    save_model(tmp_path / "a", model, dict(meta, policy=ExitPolicy((0.1, 0.2))))
    assert fingerprint(tmp_path / "a") == fingerprint(ckpt)
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)
    save_model(tmp_path / "b", model, meta)
    assert fingerprint(tmp_path / "b") != fingerprint(ckpt)


# ---------------------------------------------------------------------------------------------- server
def _valid(ckpt, images, n=2):
    f, logits = features(ckpt, images, n)
    return wire.encode(f, fingerprint(ckpt)), logits


def test_valid_request_returns_the_cloud_logits(server, ckpt, images):
    body, want = _valid(ckpt, images, 3)
    r = httpx.post(server.url + "/v1/infer", content=body, headers=auth())
    assert r.status_code == 200, r.text
    got = wire.decode(r.content, fingerprint(ckpt), (3, 10))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert int(r.headers["x-hybridexit-batch-samples"]) >= 3
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    info = httpx.get(server.url + "/v1/info", headers=auth()).json()
    assert info["fingerprint"] == fingerprint(ckpt) and info["feature_shape"] == [32, 16, 16]


def _bad_requests(ckpt, images):
    body, _ = _valid(ckpt, images, 2)
    wrong_shape = wire.encode(torch.randn(2, 16, 16, 16), fingerprint(ckpt))
    too_many = wire.encode(torch.randn(8, 32, 16, 16), fingerprint(ckpt))  # 262,192 B > MAX_BODY
    assert len(too_many) > MAX_BODY

    def chunks():
        for i in range(0, len(too_many), 16384):
            yield too_many[i:i + 16384]

    cases = {
        "truncated": ({"content": body[:1000]}, 400, "truncated"),
        "garbage": ({"content": bytes(range(256)) * 8}, 400, "bad_magic"),
        "empty": ({"content": b""}, 400, "truncated"),
        "wrong dtype": ({"content": _patch(body, 24, "<B", 3)}, 400, "wrong_dtype"),
        "wrong shape": ({"content": wrong_shape}, 400, "wrong_shape"),
        "wrong version": ({"content": _patch(body, 4, "<H", 7)}, 400, "unsupported_version"),
        "wrong fingerprint": ({"content": _patch(body, 8, "<16s", b"0123456789abcdef")}, 409, "wrong_fingerprint"),
        "missing token": ({"content": body, "headers": {}}, 401, "missing_token"),
        "wrong token": ({"content": body, "headers": auth("not-the-token")}, 401, "wrong_token"),
        "oversized": ({"content": too_many}, 413, "too_large"),
        "oversized chunked": ({"content": chunks()}, 413, "too_large"),
    }
    assert list(cases) == BAD_REQUESTS
    return cases


BAD_REQUESTS = ["truncated", "garbage", "empty", "wrong dtype", "wrong shape", "wrong version", "wrong fingerprint",
                "missing token", "wrong token", "oversized", "oversized chunked"]


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_server_refuses_bad_input_and_keeps_serving(server, ckpt, images, name):
    kw, status, code = _bad_requests(ckpt, images)[name]
    kw.setdefault("headers", auth())
    r = httpx.post(server.url + "/v1/infer", **kw)
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()
    assert err["error"] == code and err["detail"], err
    body, want = _valid(ckpt, images, 2)
    ok = httpx.post(server.url + "/v1/infer", content=body, headers=auth())
    assert ok.status_code == 200
    torch.testing.assert_close(wire.decode(ok.content, fingerprint(ckpt), (2, 10)), want, rtol=1e-5, atol=1e-5)


def test_server_answers_json_for_unknown_routes(server):
    r = httpx.get(server.url + "/v1/infer", headers=auth())
    assert r.status_code == 405 and r.json()["error"] == "http_405"
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/v1/info").status_code == 401


def test_dynamic_batching_groups_concurrent_requests(ckpt, images):
    s = ThreadServer(ckpt, ServerSettings(max_batch=8, max_wait_ms=2000, max_request_bytes=MAX_BODY))
    try:
        model, _ = load_model(ckpt)
        edge, cloud = model.split()
        with torch.no_grad():
            f = edge(images.images[:12])
            want = cloud(f)
        fp = fingerprint(ckpt)
        barrier = threading.Barrier(12)
        results = [None] * 12

        def post(i):
            with httpx.Client(timeout=30) as c:
                barrier.wait()
                results[i] = c.post(s.url + "/v1/infer", content=wire.encode(f[i:i + 1], fp))

        threads = [threading.Thread(target=post, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        sizes = []
        for i, r in enumerate(results):
            assert r is not None and r.status_code == 200, r and r.text
            # each request gets its own row back, whatever batch it rode in
            torch.testing.assert_close(wire.decode(r.content, fp, (1, 10)), want[i:i + 1], rtol=1e-5, atol=1e-5)
            sizes.append(int(r.headers["x-hybridexit-batch-samples"]))
        assert max(sizes) == 8  # 12 requests in 2 s: a full batch of 8 formed, and no batch was larger
        stats = httpx.get(s.url + "/v1/stats").json()
        assert sum(int(k) * v for k, v in stats["batch_samples"].items()) == 12
        assert max(int(k) for k in stats["batch_samples"]) == 8
    finally:
        s.stop()


def test_request_timeout_answers_503_and_the_server_goes_on(ckpt, images):
    # generous margins: the full batch below must be computed within the timeout on a loaded machine too
    s = ThreadServer(ckpt, ServerSettings(max_batch=8, max_wait_ms=4000, request_timeout_s=0.6))
    try:
        body, want = _valid(ckpt, images, 1)
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/infer", content=body)  # alone, it would wait 4 s for company
        assert r.status_code == 503 and r.json()["error"] == "timeout" and time.monotonic() - t0 < 3.5
        full, want = _valid(ckpt, images, 8)  # a full batch does not wait
        r = httpx.post(s.url + "/v1/infer", content=full)
        assert r.status_code == 200
        torch.testing.assert_close(wire.decode(r.content, fingerprint(ckpt), (8, 10)), want, rtol=1e-5, atol=1e-5)
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------- edge client
def _inputs(images):
    return Inputs(images.images, images.labels)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_edge_over_network_equals_in_process_evaluation(server, ckpt, images, reference, tmp_path, batch_size):
    out = tmp_path / "r.jsonl"
    opts = EdgeOptions(server.url, token=TOKEN, codec="fp32", batch_size=batch_size)
    summary, recs = run_edge(ckpt, _inputs(images), opts, out=out)
    assert [json.loads(line) for line in out.read_text().splitlines()] == recs
    assert [r["index"] for r in recs] == list(range(N_IMAGES))
    for got, want in zip(recs, reference):
        for k in ("index", "label", "prediction", "decided_at"):
            assert got[k] == want[k], (k, got, want)
        assert got["entropies"] == pytest.approx(want["entropies"], abs=1e-4)
        assert got["latency_ms"] > 0
    decided = {r["decided_at"] for r in recs}
    assert {"exit:0", "exit:1", "cloud"} <= decided  # every path is exercised
    per_sample = wire.frame_bytes((1, 32, 16, 16), "fp32")
    for r in recs:
        if r["decided_at"] == "cloud" and batch_size == 1:
            assert r["payload_bytes"] == per_sample
        if r["decided_at"].startswith("exit:"):
            assert r["payload_bytes"] == 0
    n_cloud = sum(r["decided_at"] == "cloud" for r in recs)
    assert summary["n"] == N_IMAGES and summary["fallback_fraction"] == 0
    assert summary["cloud_fraction"] == pytest.approx(n_cloud / N_IMAGES)
    assert summary["accuracy"] == pytest.approx(sum(r["prediction"] == r["label"] for r in recs) / N_IMAGES)
    for k in ("payload_bytes_per_offloaded", "latency_ms_p50", "latency_ms_p95", "expected_uj", "reduction"):
        assert summary[k] is not None and summary[k] > 0
    if batch_size == 1:
        assert summary["payload_bytes_per_offloaded"] == per_sample
        assert summary["requests"] == n_cloud


def test_edge_codecs_keep_edge_decisions_and_cut_bytes(server, ckpt, images, reference):
    got = {}
    for codec, compress in (("fp16", False), ("int8", False), ("int8", True)):
        opts = EdgeOptions(server.url, token=TOKEN, codec=codec + ("+zstd" if compress else ""), batch_size=4)
        s, recs = run_edge(ckpt, _inputs(images), opts)
        assert [r["decided_at"] for r in recs] == [r["decided_at"] for r in reference]
        assert s["fallback_fraction"] == 0
        got[(codec, compress)] = s["payload_bytes_per_offloaded"]
    fp32 = wire.frame_bytes((1, 32, 16, 16), "fp32")
    assert got[("fp16", False)] < fp32 / 1.9
    assert got[("int8", False)] < fp32 / 3.5
    assert got[("int8", True)] <= got[("int8", False)]


def test_eight_concurrent_clients_complete_without_errors(server, ckpt, images, reference):
    model, _ = load_model(ckpt)
    fp = fingerprint(ckpt)
    per = N_IMAGES // 8
    results, errors = [None] * 8, []

    def client(k):
        try:
            opts = EdgeOptions(server.url, token=TOKEN, batch_size=2)
            runner = EdgeRunner(model, read_policy(ckpt), fp, opts)
            with runner.cloud:
                runner.check_cloud()
                sl = slice(k * per, (k + 1) * per)
                results[k] = runner.run(images.images[sl], images.labels[sl], start=k * per)
        except Exception as e:  # noqa: BLE001 - collected: the assertion below reports it
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    recs = [r for part in results for r in part]
    assert [r["index"] for r in recs] == list(range(N_IMAGES))
    assert not any(r["decided_at"] == "fallback" for r in recs)
    assert [(r["prediction"], r["decided_at"]) for r in recs] == [(r["prediction"], r["decided_at"]) for r in reference]


def test_killing_the_server_mid_run_leaves_one_record_per_input(ckpt, images, tmp_path):
    model, _ = load_model(ckpt)
    edge, _ = model.split()
    with torch.no_grad():
        edge_preds = edge.decide(images.images, read_policy(ckpt).thresholds).predictions.tolist()
    out = tmp_path / "r.jsonl"
    kill_after = 15
    with ServerProcess(ckpt, ["--threads", "1"], env={"HYBRIDEXIT_TOKEN": TOKEN}) as srv:
        def on_record(rec):
            if rec["index"] == kill_after:
                srv.kill()

        opts = EdgeOptions(srv.url, token=TOKEN, retries=1, retry_backoff_ms=10, cooldown_s=60)
        summary, recs = run_edge(ckpt, _inputs(images), opts, out=out, on_record=on_record)
    assert len(out.read_text().splitlines()) == N_IMAGES
    assert [r["index"] for r in recs] == list(range(N_IMAGES))
    before, after = recs[:kill_after + 1], recs[kill_after + 1:]
    assert any(r["decided_at"] == "cloud" for r in before)
    assert not any(r["decided_at"] == "fallback" for r in before)
    assert not any(r["decided_at"] == "cloud" for r in after)
    fallback = [r for r in after if r["decided_at"] == "fallback"]
    assert fallback and all(r["decided_at"].startswith("exit:") for r in after if r not in fallback)
    for r in fallback:  # the answer of the last exit the sample reached
        assert r["prediction"] == edge_preds[r["index"]] and r["error"]
    assert summary["fallback_fraction"] == pytest.approx(len(fallback) / N_IMAGES)
    # batch size 1: one request per offloaded input; the first one after the kill was sent and retried once,
    # the others were skipped during the cool-down
    assert summary["failed_requests"] == 1 and summary["retries"] == 1
    assert summary["skipped_requests"] == len(fallback) - 1
    assert sum(r["payload_bytes"] > 0 for r in fallback) == 1

    with pytest.raises(CloudUnavailable, match="attempts"):
        run_edge(ckpt, _inputs(images), EdgeOptions(srv.url, token=TOKEN, retries=1, retry_backoff_ms=10,
                                                    on_cloud_failure="error"))


def test_edge_error_policy_stops_mid_run(ckpt, images):
    model, _ = load_model(ckpt)
    dead = bind_socket("127.0.0.1", 0)
    url = url_of(dead)
    dead.close()  # nothing listens there any more: connection refused
    runner = EdgeRunner(model, read_policy(ckpt), fingerprint(ckpt),
                        EdgeOptions(url, retries=2, retry_backoff_ms=1, on_cloud_failure="error"))
    with pytest.raises(CloudUnavailable, match="3 attempts.*on-cloud-failure fallback"):
        runner.run(images.images, images.labels)
    runner = EdgeRunner(model, read_policy(ckpt), fingerprint(ckpt), EdgeOptions(url, retries=0, cooldown_s=60))
    recs = runner.run(images.images, images.labels)
    assert len(recs) == N_IMAGES and {r["decided_at"] for r in recs} <= {"exit:0", "exit:1", "fallback"}


def test_edge_refuses_other_model_and_wrong_token(server, ckpt, images, tmp_path):
    model, meta = load_model(ckpt)
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)
    save_model(tmp_path / "other", model, meta)
    with pytest.raises(CloudRejected, match="same checkpoint"):
        run_edge(tmp_path / "other", _inputs(images), EdgeOptions(server.url, token=TOKEN))
    with pytest.raises(CloudRejected, match="wrong_token"):
        run_edge(ckpt, _inputs(images), EdgeOptions(server.url, token="wrong-token-123"))
    with CloudClient(server.url, TOKEN) as c:  # and per request, not only at the start
        body = wire.encode(torch.zeros(1, 32, 16, 16), fingerprint(tmp_path / "other"))
        with pytest.raises(CloudRejected) as e:
            c.infer(body, fingerprint(ckpt), 10)
        assert e.value.status == 409 and e.value.attempts == 1


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_edge_on_an_image_folder(server, ckpt, images, tmp_path, capsys, monkeypatch):
    from PIL import Image

    for i in range(6):
        d = tmp_path / "imgs" / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images.images[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    monkeypatch.setenv("HYBRIDEXIT_TOKEN", TOKEN)
    out = tmp_path / "r.jsonl"
    code = main(["edge", str(ckpt), "--cloud", server.url, "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--codec", "fp16+zstd", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["n"] == 6 and len(recs) == 6
    assert sorted(r["path"] for r in recs) == sorted(f"class{i % 3}/{i}.png" for i in range(6))
    assert [r["label"] for r in recs] == [int(r["path"][5]) for r in recs]
    assert summary["codec"] == "fp16" and summary["compressed"] is True
    for k in ("accuracy", "edge_fraction", "expected_uj", "payload_bytes_per_offloaded", "latency_ms_p50",
              "latency_ms_p95"):
        assert k in summary
    code = main(["edge", str(ckpt), "--cloud", server.url, "--images", str(tmp_path / "imgs" / "class0")])
    assert code == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "n/a" in table  # unlabelled images: no accuracy


def test_cli_serve_refuses_unsafe_bind_and_bad_checkpoints(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYBRIDEXIT_TOKEN", raising=False)
    assert main(["serve", str(ckpt), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "without a token" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((ckpt / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    assert main(["serve", str(broken), "--port", "0"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    (tmp_path / "short").write_text("short\n")
    assert main(["serve", str(ckpt), "--port", "0", "--token-file", str(tmp_path / "short")]) == 2
    assert "at least 8" in capsys.readouterr().err


def test_server_process_reports_why_it_did_not_start(tmp_path):
    from hybridexit.runtime.process import ServerStartError

    with pytest.raises(ServerStartError, match="not a checkpoint"):
        ServerProcess(tmp_path / "missing", timeout_s=60)


def test_percentiles_and_summary_shape():
    from hybridexit.model.energy import energy_report
    from hybridexit.runtime.summary import edge_summary, format_summary

    cfg = HybridConfig(depth=8, edge_layers=4, edge_bits=1, exits=(2, 4))
    recs = [{"index": i, "label": 0, "prediction": 0 if i % 2 else 1,
             "decided_at": ["exit:0", "cloud", "fallback", "exit:1"][i % 4], "entropies": [],
             "latency_ms": float(i), "payload_bytes": 100 if i % 4 in (1, 2) else 0} for i in range(20)]
    s = edge_summary(recs, energy_report(cfg), (1.0, 1.0))
    assert s["accuracy"] == 0.5 and s["fallback_fraction"] == 0.25
    assert s["payload_bytes_per_offloaded"] == 100 and s["payload_bytes_per_input"] == 50
    assert s["latency_ms_p50"] == 9.5 and math.isclose(s["latency_ms_p95"], 18.05)
    assert "bytes per offloaded input" in format_summary(s)
