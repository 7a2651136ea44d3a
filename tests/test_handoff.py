"""Hand-off at any block boundary (issue 39): ``HybridNet.split(at=b)`` composes to the whole network at every b,
exits keep their positions (the edge holds those before b), and the server answers features at any boundary the
frame names, over a real loopback socket, with the whole network's logits."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
import torch
from conftest import write_tiny_checkpoint
from test_runtime import ThreadServer

from hybridexit.errors import ConfigError
from hybridexit.model.checkpoint import fingerprint, load_model
from hybridexit.model.hybrid import HybridNet
from hybridexit.model.resnet import HybridConfig
from hybridexit.runtime import wire
from hybridexit.runtime.server import ServerSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _images(n=6, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_split_at_every_boundary_gives_the_whole_networks_logits():
    torch.manual_seed(0)
    model = HybridNet(HybridConfig(depth=14, num_classes=10, edge_layers=6, edge_bits=1, exits=(2, 6))).eval()
    x = _images()
    with torch.no_grad():
        want = model(x)[-1]
        n = len(model.blocks)
        for b in range(n + 1):
            edge, cloud = model.split(at=b)
            h = edge(x)
            assert tuple(h.shape[1:]) == edge.feature_shape == cloud._in_shape
            torch.testing.assert_close(cloud(h), want, rtol=1e-5, atol=1e-5)
            assert sorted(edge.exits.keys()) == [k for k, layer in (("2", 2), ("6", 6)) if layer // 2 - 1 < b]
            r = edge.decide(x, (0.0, 0.0))  # nothing exits: every sample goes on with the same features
            torch.testing.assert_close(r.features, h)
        default_edge, default_cloud = model.split()
        assert default_edge.boundary == default_cloud.first_block == model.cfg.edge_blocks
    with pytest.raises(ConfigError, match="boundary"):
        model.split(at=n + 1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("handoff") / "ck", exits=(2, 4), thresholds=(0.5, 0.5))
    s = ThreadServer(ckpt, ServerSettings(max_batch=16, max_wait_ms=20))
    yield ckpt, s
    s.stop()


def _post(url, body):
    return httpx.post(url + "/v1/infer", content=body, headers={"Content-Type": wire.CONTENT_TYPE}, timeout=30)


def test_server_answers_features_at_any_boundary_the_frame_names(served):
    ckpt, s = served
    model, _ = load_model(ckpt)
    fp = fingerprint(ckpt)
    x = _images(3, 1)
    info = httpx.get(s.url + "/v1/info").json()
    n = len(model.blocks)
    assert info["boundary"] == model.cfg.edge_blocks and info["boundaries"] == list(range(n + 1))
    with torch.no_grad():
        want = model(x)[-1]
        bodies = {}
        for b in range(n + 1):
            h = model.split(at=b)[0](x)
            for codec in ("fp32", "int8"):
                body = wire.encode(h, fp, codec, boundary=b)
                assert wire.parse_header(body).boundary == b
                bodies[(b, codec)] = body
    # all at once: the batcher must not mix boundaries in one forward pass
    with cf.ThreadPoolExecutor(8) as pool:
        replies = dict(zip(bodies, pool.map(lambda body: _post(s.url, body), bodies.values())))
    for (b, codec), r in replies.items():
        assert r.status_code == 200, (b, codec, r.text)
        got = wire.decode(r.content, fp, (3, 10))
        if codec == "fp32":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert (got.argmax(1) == want.argmax(1)).float().mean() >= 2 / 3
    plain = wire.encode(model.split()[0](x).detach(), fp)  # a frame that names no boundary: the checkpoint's
    assert wire.parse_header(plain).boundary is None
    torch.testing.assert_close(wire.decode(_post(s.url, plain).content, fp, (3, 10)), want, rtol=1e-4, atol=1e-4)


def test_server_refuses_a_boundary_outside_the_network_or_features_of_another(served):
    ckpt, s = served
    model, _ = load_model(ckpt)
    fp = fingerprint(ckpt)
    n = len(model.blocks)
    with torch.no_grad():
        h1 = model.split(at=1)[0](_images(1))
    r = _post(s.url, wire.encode(h1, fp, boundary=n + 1))
    assert r.status_code == 400 and r.json()["error"] == wire.WrongShape.code and "boundary" in r.json()["detail"]
    r = _post(s.url, wire.encode(h1, fp, boundary=n))  # stem-sized features announced at the last boundary
    assert r.status_code == 400 and r.json()["error"] == wire.WrongShape.code
    with pytest.raises(wire.WireError, match="boundary"):
        wire.encode(h1, fp, boundary=-1)
