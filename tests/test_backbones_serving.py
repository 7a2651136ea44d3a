"""A non-CIFAR backbone through the engines and the runtime: ``--engine auto`` picks an engine that runs it, the
onnx and packed engines refuse it in one line, and a real server and edge runner carry its feature shape (from the
config, not from 32x32 arithmetic): records equal the in-process evaluation."""

import pytest
import torch
from test_runtime import TOKEN, ThreadServer

from hybridexit.data import Inputs, Split
from hybridexit.engines import available_engines, get_engine, resolve_engine
from hybridexit.errors import EngineError
from hybridexit.model.checkpoint import load_model, save_model
from hybridexit.model.hybrid import HybridNet
from hybridexit.model.policy import ExitPolicy, read_policy, write_policy
from hybridexit.model.resnet import HybridConfig, edge_feature_shape
from hybridexit.runtime.client import EdgeOptions, run_edge
from hybridexit.runtime.server import ServerSettings
from hybridexit.workflows.evaluate import evaluate_conditional

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
SIZE, N = 40, 24


@pytest.mark.parametrize("name,bits", [("resnet18", 1), ("resnet50", 2), ("mobilenetv2", 4)])
def test_auto_picks_torch_and_native_engines_refuse_in_one_line(name, bits):
    cfg = HybridConfig(backbone=name, image_size=SIZE, edge_layers=2, edge_bits=bits, exits=(2,))
    assert available_engines(cfg) == ["torch"] and resolve_engine("auto", cfg) == "torch"
    edge = HybridNet(cfg).eval().split()[0]
    assert get_engine("auto", edge) is edge
    for engine in ("packed", "onnx"):
        with pytest.raises(EngineError, match=f"the {engine} engine runs the CIFAR ResNets' edge blocks, not {name}'s"):
            get_engine(engine, edge)


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = HybridConfig(backbone="resnet18", num_classes=5, image_size=SIZE, edge_layers=3, edge_bits=1, exits=(2,))
    model = HybridNet(cfg)
    with torch.no_grad():
        model.train()
        model(torch.randint(0, 256, (16, 3, SIZE, SIZE), dtype=torch.uint8))  # non-trivial BatchNorm statistics
        model.exits["2"].fc.weight.normal_(0, 1.0)
        model.eval()
    g = torch.Generator().manual_seed(2)
    images = Split(torch.randint(0, 256, (N, 3, SIZE, SIZE), dtype=torch.uint8, generator=g),
                   torch.randint(0, 5, (N,), generator=g), "test")
    from hybridexit.model.exits import entropy

    with torch.no_grad():
        t = float(entropy(model(images.images)[0]).median())
    path = tmp_path_factory.mktemp("bb") / "r18"
    save_model(path, model, {"data": {"name": "folder", "mean": [0.0] * 3, "std": [1.0] * 3,
                                      "classes": [f"c{i}" for i in range(5)]}})
    write_policy(path, ExitPolicy((t,)))
    return path, images


def test_server_and_edge_carry_a_resnet18_feature_shape(resnet18_ckpt):
    path, images = resnet18_ckpt
    model, _ = load_model(path)
    assert model.cfg.backbone == "resnet18" and edge_feature_shape(model.cfg) == (128, 5, 5)
    want = [d.to_json() for d in evaluate_conditional(model, images, read_policy(path).thresholds, batch_size=64)]
    srv = ThreadServer(path, ServerSettings(max_batch=8, max_wait_ms=5, request_timeout_s=20, token=TOKEN))
    try:
        assert srv.model.feature_shape == (128, 5, 5)
        summary, recs = run_edge(path, Inputs(images.images, images.labels),
                                 EdgeOptions(srv.url, token=TOKEN, codec="fp32", batch_size=4))
    finally:
        srv.stop()
    assert summary["engine"] == "torch" and all(r["engine"] == "torch" for r in recs)
    assert {r["decided_at"] for r in recs} == {"exit:0", "cloud"}
    for got, ref in zip(recs, want):
        assert (got["prediction"], got["decided_at"]) == (ref["prediction"], ref["decided_at"])
