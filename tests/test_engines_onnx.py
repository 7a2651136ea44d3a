"""ONNX export and the onnx engine: QLinearConv binary convs and exact k-bit integer sums against PyTorch, every
recipe option in a whole edge deciding as the torch engine, the cloud half, ``hybridexit export``."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from hybridexit.engines import available_engines  # noqa: E402
from hybridexit.engines.onnx_engine import OnnxCloud, OnnxEdge, session  # noqa: E402
from hybridexit.engines.onnx_export import GraphBuilder, float_conv_exact, weight_levels  # noqa: E402
from hybridexit.model.exits import entropy  # noqa: E402
from hybridexit.model.hybrid import CLOUD, HybridNet  # noqa: E402
from hybridexit.model.quant import BNQuantConv, ChannelShift, RPReLU, quantize_weight, uniform_ste  # noqa: E402
from hybridexit.model.resnet import HybridConfig  # noqa: E402


def _run(g: GraphBuilder, out: str, x: torch.Tensor, int32: bool = False) -> torch.Tensor:
    """Run the graph built in ``g`` from input "x" (float) to ``out`` (float, or int32)."""
    g.op("Identity", [out], "y")
    h, tp = g.onnx.helper, g.onnx.TensorProto
    m = g.model([h.make_tensor_value_info("x", tp.FLOAT, list(x.shape))],
                [h.make_tensor_value_info("y", tp.INT32 if int32 else tp.FLOAT, ["N", "C", "H", "W"])], "t")
    return torch.from_numpy(session(m.SerializeToString()).run(["y"], {"x": x.numpy()})[0])


def _randomize(module, gen):
    """Random BatchNorm statistics (negative scales too), RSign thresholds and RPReLU parameters."""
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            c = m.num_features
            m.weight.data = torch.randn(c, generator=gen)
            m.bias.data = torch.randn(c, generator=gen) * 0.3
            m.running_mean.data = torch.randn(c, generator=gen) * 0.3
            m.running_var.data = torch.rand(c, generator=gen) + 0.5
        elif isinstance(m, ChannelShift):
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.3
        elif isinstance(m, RPReLU):
            c = m.slope.numel()
            m.shift_in.data, m.shift_out.data = torch.randn(c, generator=gen) * 0.3, torch.randn(c, generator=gen) * 0.3
            m.slope.data = torch.rand(c, generator=gen) * 1.5 - 0.25  # negative slopes too


def _onnx_binary_conv_sums(z: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """The ONNX binary conv on input z with +-1 weights (alpha = 1): its dequantized integer sums."""
    conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, stride, 1, bias=False)
    conv.weight.data = torch.where(w >= 0, 1.0, -1.0)
    g = GraphBuilder()
    return _run(g, g.binary_conv("x", conv), z).double()


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


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kbit_level_indices_are_the_torch_quantizers(bits):
    """q from the graph's Clip/Add/Mul/Round is torch's level index bit for bit, at and around every rounding
    boundary and outside [-1, 1]; the weight levels reproduce ``quantize_weight`` exactly."""
    zz = 2**bits - 1
    g = torch.Generator().manual_seed(bits)
    bounds = torch.tensor([(2 * n + 1) / zz - 1 for n in range(zz)], dtype=torch.float32)  # (z + 1) Z / 2 = n + 1/2
    near = torch.cat([bounds, torch.nextafter(bounds, bounds + 1), torch.nextafter(bounds, bounds - 1)])
    z = torch.cat([near, torch.randn(4000, generator=g) * 1.5, torch.tensor([-1.0, 1.0, 0.0, -7.0, 7.0])])
    gb = GraphBuilder()
    q = _run(gb, gb.level_index("x", bits), z.view(1, 1, 1, -1)).flatten()
    assert torch.equal(q * (2.0 / zz) - 1.0, uniform_ste(z, bits))  # _UniformSTE's own last two operations
    assert q.min() == 0 and q.max() == zz and torch.equal(q, q.round())
    w = torch.randn(7, 5, 3, 3, generator=g)
    w[1] = 0.0  # an all-zero channel: the scale's clamp
    r, s = weight_levels(w, bits)
    assert torch.equal((r * (2.0 / zz) - 1.0) * s.view(-1, 1, 1, 1), quantize_weight(w, bits))
    assert r.min() >= 0 and r.max() <= zz


def _kbit_sums(z, w, bits, stride, integer):
    """(ONNX sums, exact float64 sums) of a k-bit conv of the quantized z with the weights' integer levels."""
    zz = 2**bits - 1
    r, _ = weight_levels(w, bits)
    gb = GraphBuilder()
    q = gb.level_index("x", bits)
    out = gb.kbit_sum_integer(q, r, bits, stride, z.shape[-1]) if integer else gb.kbit_sum_float(q, r, bits, stride)
    got = _run(gb, out, z, integer)
    a = 2 * torch.round((z.clamp(-1.0, 1.0) + 1.0) * (zz / 2.0)).double() - zz  # the levels 2q - Z
    ref = F.conv2d(a, 2 * r.double() - zz, stride=stride, padding=1)  # zero padding: 0, not a level
    return got, ref


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cin,cout,size,stride", [(16, 16, 8, 1), (3, 5, 7, 2), (13, 7, 6, 1), (28, 9, 5, 2),
                                                   (33, 6, 5, 1), (64, 8, 4, 2)])
def test_kbit_integer_sums_are_exact(bits, cin, cout, size, stride):
    """Both ways of computing a k-bit conv's integer sum equal PyTorch's float64 sum of the levels exactly,
    including the largest sums (every activation and weight at the top level): float ``Conv`` wherever
    ``float_conv_exact`` admits it, ``ConvInteger`` (int32) always."""
    g = torch.Generator().manual_seed(bits * 1000 + cin * 10 + cout)
    z = torch.randn(3, cin, size, size, generator=g)
    z[0] = 2.0  # all at level +Z
    z[1, :, : size // 2] = -1.0  # a block at level -Z
    w = torch.randn(cout, cin, 3, 3, generator=g)
    w[0] = 1.0  # every weight at +Z: sums of magnitude 9 C Z^2 on image 0
    w[1] = -w[1].abs()
    for integer in (True, False):
        if not integer and not float_conv_exact(cin, bits):
            continue
        got, ref = _kbit_sums(z, w, bits, stride, integer)
        assert got.dtype == (torch.int32 if integer else torch.float32)
        assert torch.equal(got.double(), ref), integer
    assert ref.abs().max() == 9 * cin * (2**bits - 1) ** 2  # the extreme was reached


@pytest.mark.parametrize("bits,opts", [(2, {}), (4, {"act_shift": True, "rprelu": True}), (8, {"rprelu": True}),
                                       (4, {"act_shift": True})])
@pytest.mark.parametrize("cin,cout,stride", [(16, 16, 1), (7, 11, 2), (33, 40, 2)])
def test_kbit_quan_conv_is_the_torch_engines_bit_for_bit(bits, opts, cin, cout, stride):
    """BatchNorm (float64 Mul + Add: the fused multiply-add's rounding), RSign, quantizer, exact integer conv,
    scale, RPReLU: the torch engine's eval-mode values (``quant.quantized_conv_exact``) bit for bit, and the exact value
    (the float64 conv of torch's own levels) to float rounding."""
    g = torch.Generator().manual_seed(bits + cin * cout)
    q = BNQuantConv(cin, cout, stride, bits, **opts).eval()
    _randomize(q, g)
    q.conv.weight.data = torch.randn(q.conv.weight.shape, generator=g)
    x = torch.randn(2, cin, 9, 9, generator=g)
    gb = GraphBuilder()
    got = _run(gb, gb.quan_conv("x", q, 9), x)
    zz = 2**bits - 1
    with torch.no_grad():
        ref = q(x)
        z = q.bn(x) if q.shift is None else q.shift(q.bn(x))
        r, s = weight_levels(q.conv.weight, bits)
        a = 2 * torch.round((z.clamp(-1.0, 1.0) + 1.0) * (zz / 2.0)).double() - zz
        exact = F.conv2d(a, 2 * r.double() - zz, stride=stride, padding=1) * (s.double() / zz**2).view(1, -1, 1, 1)
        if q.rprelu is not None:
            gamma, zeta = (t.double().view(1, -1, 1, 1) for t in (q.rprelu.shift_in, q.rprelu.shift_out))
            exact = F.prelu(exact - gamma, q.rprelu.slope.double()) + zeta
    assert torch.equal(got, ref)
    torch.testing.assert_close(got.double(), exact, rtol=3e-7, atol=3e-7 * exact.abs().max().item())  # ~2 ulps


def test_fused_batchnorm_rounds_as_torchs_and_float32_mul_add_does_not():
    """Before a quantizer the graph's BatchNorm is torch's (one rounding), on values where a float32 Mul + Add
    rounds twice: the case that moved quantizer levels of the 4-bit headline."""
    g = torch.Generator().manual_seed(5)
    bn = torch.nn.BatchNorm2d(64).eval()
    bn.running_mean.uniform_(-1, 1, generator=g)
    bn.running_var.uniform_(0.5, 2, generator=g)
    bn.weight.data.uniform_(0.5, 2, generator=g)
    bn.bias.data.uniform_(-1, 1, generator=g)
    x = torch.randn(4, 64, 16, 16, generator=g)
    with torch.no_grad():
        ref = bn(x)
    outs = {}
    for fused in (True, False):
        gb = GraphBuilder()
        outs[fused] = _run(gb, gb.bn("x", bn, fused=fused), x)
    assert torch.equal(outs[True], ref)
    assert not torch.equal(outs[False], ref)  # some of the 65,536 values round the other way


def test_rounded_once_stem_is_the_torch_engines_bit_for_bit():
    """A quantized edge's stem (``quant.RoundedOnceConv2d``): shifted copies and a float64 MatMul, then one
    rounding: torch's eval-mode value bit for bit, where a float32 ``Conv`` differs in the last bits."""
    from hybridexit.model.quant import RoundedOnceConv2d

    g = torch.Generator().manual_seed(6)
    stem = RoundedOnceConv2d(3, 16, 3, 1, 1, bias=False).eval()
    stem.weight.data = torch.randn(stem.weight.shape, generator=g)
    x = torch.randn(3, 3, 12, 12, generator=g)
    with torch.no_grad():
        ref = stem(x)
    gb = GraphBuilder()
    assert torch.equal(_run(gb, gb.rounded_once_conv("x", stem), x), ref)
    gb = GraphBuilder()
    plain = _run(gb, gb.float_conv("x", stem), x)
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(plain, ref)


RECIPES = {  # (edge bits, config options): every recipe option, odd widths, every exit pool
    "binary": (1, {}),
    "binary-rsign-rprelu-hidden": (1, {"act_shift": True, "rprelu": True, "ste": "approx", "exit_hidden": 24}),
    "binary-odd-k4": (1, {"width": 7, "exit_pool": "k4", "rprelu": True}),
    "2-bit": (2, {}),
    "2-bit-odd-rsign": (2, {"width": 5, "act_shift": True}),
    "4-bit": (4, {}),
    "4-bit-options-k2": (4, {"act_shift": True, "rprelu": True, "exit_hidden": 16, "exit_pool": "k2"}),
    "4-bit-global": (4, {"rprelu": True, "exit_pool": "global"}),
    "8-bit-convinteger": (8, {"width": 32, "exit_hidden": 8}),
}


def _net(bits, opts, seed=0, depth=14, edge_layers=8, exits=(4, 8)):
    torch.manual_seed(seed)
    model = HybridNet(HybridConfig(depth=depth, edge_layers=edge_layers, edge_bits=bits, exits=exits, **opts)).eval()
    _randomize(model, torch.Generator().manual_seed(seed))
    for ex in model.exits.values():  # sharper exits so that a threshold splits the batch
        ex.fc.weight.data *= 30
    return model


def _split_thresholds(model, x):
    """Per exit, the midpoint of the widest gap between adjacent entropies in the middle half of the samples
    that reach it: a mix of every exit and the cloud, and no sample near a threshold, where rounding decides."""
    with torch.no_grad():
        _, logits = model.forward_intermediates(x, model.cfg.edge_blocks)
    out, reach = [], torch.ones(len(x), dtype=torch.bool)
    for lg in logits:
        e = entropy(lg)
        v = e[reach].sort().values
        i = max(range(len(v) // 4, 3 * len(v) // 4), key=lambda k: v[k + 1] - v[k])
        out.append((v[i] + v[i + 1]).item() / 2)
        reach &= e >= out[-1]
    return out


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_whole_onnx_edge_of_every_recipe_decides_as_torch(recipe):
    bits, opts = RECIPES[recipe]
    model = _net(bits, opts, seed=len(recipe))
    edge, cloud = model.split()
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    thr = _split_thresholds(model, x)
    ref = edge.decide(x, thr)
    eng = OnnxEdge.from_edge(edge)
    got = eng.decide(x, thr)
    assert {0, 1, CLOUD} == set(ref.decided_at.tolist())  # both exits and the cloud
    for field in ("decided_at", "predictions", "remaining"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    torch.testing.assert_close(got.entropies, ref.entropies, rtol=1e-3, atol=1e-3, equal_nan=True)
    # rounded-once stem, fused BatchNorm, exact sums (binary: none saturates here): torch's features bit for bit
    assert torch.equal(got.features, ref.features)
    out = eng.run(x)  # the graph's own entropy outputs: the exit rule's entropy of its logits
    for j in range(len(edge.cfg.exits)):
        torch.testing.assert_close(out[f"entropy_{j}"], entropy(out[f"logits_{j}"]), rtol=1e-5, atol=1e-6)
    ops = {n.op_type for n in onnx.load_from_string(eng.model_bytes).graph.node}
    assert ("QLinearConv" in ops) == (bits == 1)
    assert ("ConvInteger" in ops) == (bits == 8)  # exact 8-bit sums, 32+ channels: int32
    with torch.no_grad():  # the cloud half as float ONNX on the torch engine's features
        torch.testing.assert_close(OnnxCloud(cloud)(ref.features), cloud(ref.features), rtol=1e-4, atol=1e-4)


def test_binary_edge_features_equal_torch_bit_for_bit():
    """Binary edges: exact sums of signs (QLinearConv, no saturation at these widths) times alpha, as torch's."""
    edge, _ = _net(1, {"act_shift": True, "rprelu": True}, seed=3).split()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(OnnxEdge.from_edge(edge).forward(x), edge(x))


def test_onnx_engine_runs_every_network_and_refuses_float_images():
    from hybridexit.errors import InputShapeError

    for bits in (1, 2, 4, 8, 32):
        opts = {"act_shift": True, "rprelu": True, "exit_hidden": 8, "exit_pool": "k4"} if bits != 32 else {}
        assert "onnx" in available_engines(HybridConfig(depth=14, edge_layers=4, edge_bits=bits, exits=(4,), **opts))
    edge, _ = _net(4, {}).split()
    with pytest.raises(InputShapeError, match="uint8"):
        OnnxEdge.from_edge(edge).decide(torch.rand(2, 3, 32, 32), [0.5, 0.5])


def test_onnx_float_edge_matches_torch():
    torch.manual_seed(0)
    edge, _ = HybridNet(HybridConfig(depth=14, edge_layers=8, edge_bits=32, exits=(8,))).eval().split()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        np.testing.assert_allclose(OnnxEdge.from_edge(edge).forward(x).numpy(), edge(x).numpy(), rtol=1e-4, atol=1e-4)


def test_cli_exports_a_k_bit_edge_with_options_that_decides_as_torch(tmp_path, tiny_cifar, capsys):
    """``hybridexit export --format onnx``: the written graphs themselves (``evaluate --engine onnx`` on every
    engine a network admits: test_engines_packed)."""
    from hybridexit.cli import main
    from hybridexit.data import load_cifar
    from hybridexit.model.checkpoint import save_model

    model = _net(4, {"act_shift": True, "rprelu": True, "exit_hidden": 16}, seed=5)
    ck = str(tmp_path / "ck")
    save_model(ck, model, {"data": {"name": "cifar10"}})
    images = load_cifar("cifar10", tiny_cifar).test.images
    thr = _split_thresholds(model, images)
    assert main(["export", ck, "--format", "onnx", "--out", str(tmp_path / "x")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert set(exported["files"]) == {"edge.onnx", "cloud.onnx"}
    assert exported["edge_bytes"] < exported["edge_float_bytes"]  # 4-bit weights stored as uint8 levels
    edge, cloud = model.split()
    loaded = OnnxEdge(model.cfg, (tmp_path / "x" / "edge.onnx").read_bytes())
    ref, got = edge.decide(images, thr), loaded.decide(images, thr)
    assert {0, 1, CLOUD} == set(ref.decided_at.tolist())
    assert torch.equal(got.decided_at, ref.decided_at) and torch.equal(got.predictions, ref.predictions)
    cloud_graph = session((tmp_path / "x" / "cloud.onnx").read_bytes())
    logits = torch.from_numpy(cloud_graph.run(["logits"], {"features": ref.features.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(logits, cloud(ref.features), rtol=1e-4, atol=1e-4)
