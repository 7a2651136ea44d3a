"""ONNX export and the onnx engine: QLinearConv binary convs against exact integer sums, whole edge and cloud."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")

from test_engines_packed import _random_binary_net, _thresholds  # noqa: E402

from hybridexit.engines.onnx_engine import OnnxCloud, OnnxEdge, session  # noqa: E402
from hybridexit.engines.onnx_export import GraphBuilder  # noqa: E402
from hybridexit.exits import entropy  # noqa: E402
from hybridexit.hybrid import CLOUD  # noqa: E402


def _onnx_binary_conv_sums(z: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """The ONNX binary conv on input z with +-1 weights (alpha = 1): its dequantized integer sums."""
    conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, stride, 1, bias=False)
    conv.weight.data = torch.where(w >= 0, 1.0, -1.0)
    g = GraphBuilder()
    g.op("Identity", [g.binary_conv("z", conv)], "y")
    cout = w.shape[0]
    h, tp = g.onnx.helper, g.onnx.TensorProto
    m = g.model([h.make_tensor_value_info("z", tp.FLOAT, list(z.shape))],
                [h.make_tensor_value_info("y", tp.FLOAT, ["N", cout, "H", "W"])], "t")
    return torch.from_numpy(session(m.SerializeToString()).run(["y"], {"z": z.numpy()})[0]).double()


@pytest.mark.parametrize("cin,cout,size,stride", [(16, 16, 8, 1), (32, 8, 6, 2), (64, 5, 4, 1), (3, 4, 5, 2),
                                                   (13, 6, 5, 1), (15, 7, 6, 1), (33, 9, 7, 2)])
def test_onnx_binary_conv_exact_where_sums_fit_else_one_step(cin, cout, size, stride):
    g = torch.Generator().manual_seed(cin * 10 + cout)
    z = torch.randn(2, cin, size, size, generator=g)
    z[0, :, : size // 2 + 1] = 1.0  # a block of agreeing signs: sums at the extremes (saturation) where fan-in allows
    w = torch.randn(cout, cin, 3, 3, generator=g)
    w[0] = 1.0
    w[1, 0, 0, 0] = 0.0  # sign(0) = +1
    ref = F.conv2d(torch.where(z >= 0, 1.0, -1.0).double(), torch.where(w >= 0, 1.0, -1.0).double(), stride=stride, padding=1)
    got = _onnx_binary_conv_sums(z, w, stride)
    fan_in = 9 * cin
    if fan_in <= 127:  # requantization scale 1: every sum fits
        assert torch.equal(got, ref)
        return
    inside = (ref >= -256) & (ref <= 254)
    assert torch.equal(got[~inside], ref[~inside].clamp(-256, 254))  # saturated beyond uint8's range
    if cin % 2 == 0:  # even fan-in: even sums, exact at scale 2
        assert torch.equal(got[inside], ref[inside])
    else:  # odd sums: within one requantization step (2), rounded half to even
        assert (got[inside] - ref[inside]).abs().max() <= 1
    if fan_in > 256:
        assert (~inside).any()  # the test reached the saturated range


def test_onnx_edge_decides_as_torch_engine_and_cloud_matches():
    model = _random_binary_net()
    edge, cloud = model.split()
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    thr = _thresholds(edge, x)
    ref = edge.decide(x, thr)
    eng = OnnxEdge.from_edge(edge)
    got = eng.decide(x, thr)
    assert (ref.decided_at == CLOUD).any() and (ref.decided_at >= 0).any()
    assert torch.equal(got.decided_at, ref.decided_at)
    assert torch.equal(got.predictions, ref.predictions)
    assert torch.equal(got.remaining, ref.remaining)
    torch.testing.assert_close(got.entropies, ref.entropies, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got.features, ref.features, rtol=1e-4, atol=1e-4)
    out = eng.run(x)  # the graph's own entropy outputs: the exit rule's entropy of its logits
    for j in range(len(edge.cfg.exits)):
        torch.testing.assert_close(out[f"entropy_{j}"], entropy(out[f"logits_{j}"]), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(OnnxCloud(cloud)(ref.features), cloud(ref.features), rtol=1e-4, atol=1e-4)


def test_onnx_edge_refuses_float_images_and_k_bit_edges():
    from hybridexit.errors import EngineError, InputShapeError
    from hybridexit.hybrid import HybridNet
    from hybridexit.resnet import HybridConfig

    edge, _ = _random_binary_net().split()
    with pytest.raises(InputShapeError, match="uint8"):
        OnnxEdge.from_edge(edge).decide(torch.rand(2, 3, 32, 32), [0.5, 0.5])
    k_bit, _ = HybridNet(HybridConfig(depth=14, edge_layers=4, edge_bits=4, exits=(4,))).split()
    with pytest.raises(EngineError, match="4-bit"):
        OnnxEdge.from_edge(k_bit)


def test_onnx_float_edge_matches_torch():
    from hybridexit.hybrid import HybridNet
    from hybridexit.resnet import HybridConfig

    torch.manual_seed(0)
    edge, _ = HybridNet(HybridConfig(depth=14, edge_layers=8, edge_bits=32, exits=(8,))).eval().split()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        np.testing.assert_allclose(OnnxEdge.from_edge(edge).forward(x).numpy(), edge(x).numpy(), rtol=1e-4, atol=1e-4)
