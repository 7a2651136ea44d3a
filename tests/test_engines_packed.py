"""The packed engine: exact integer convolutions, fused blocks, and whole-edge decisions vs the torch engine."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridexit.engines.packed import (
    PackedEdge,
    binary_block_params,
    binary_conv_state,
    export_state,
    fold_bn,
    kernel_weights,
)
from hybridexit.errors import EngineError
from hybridexit.model.hybrid import CLOUD, HybridNet
from hybridexit.model.resnet import BasicBlock, HybridConfig

try:
    kernels = pytest.importorskip("hybridexit.engines.native").kernels()
except EngineError as e:  # no C++ compiler or ninja here: the engine refuses with this one-line error
    pytest.skip(str(e), allow_module_level=True)
ISAS = list(range(kernels.best_isa() + 1))


def _nhwc(x):
    return x.permute(0, 2, 3, 1).contiguous()


def _randomize_bn(module, gen):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.randn(c, generator=gen)  # negative scales too: sign() must follow them
            m.bias.data = torch.randn(c, generator=gen) * 0.3
            m.running_mean.data = torch.randn(c, generator=gen) * 0.3
            m.running_var.data = torch.rand(c, generator=gen) + 0.5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cin,cout,size,stride", [(16, 16, 8, 1), (3, 5, 7, 1), (17, 33, 9, 2), (64, 8, 4, 2),
                                                   (70, 65, 5, 1), (32, 64, 6, 2), (1, 1, 1, 1), (5, 3, 2, 2)])
def test_packed_conv_equals_torch_integer_sums(isa, cin, cout, size, stride):
    g = torch.Generator().manual_seed(cin * 100 + cout + stride)
    x = torch.randn(2, cin, size, size, generator=g)
    a, b = torch.randn(cin, generator=g), torch.randn(cin, generator=g) * 0.5
    w = torch.randn(cout, cin, 3, 3, generator=g)
    w[0, 0, 1, 1] = 0.0  # sign(0) = +1
    bits = torch.addcmul(b[:, None, None].double(), x.double(), a[:, None, None].double()) >= 0
    signs = torch.where(bits, 1.0, -1.0).double()
    # zero padding of the sign input, as in training: padded taps contribute 0, not -1 or +1
    ref = F.conv2d(signs, torch.where(w >= 0, 1.0, -1.0).double(), stride=stride, padding=1)
    packed = kernels.sign_pack(_nhwc(x), a, b, torch.empty(0), isa)
    wt, wpop = kernel_weights(w >= 0)
    got = kernels.conv_int(packed, wt, wpop, cin, stride, isa)
    assert got.dtype == torch.int32
    assert torch.equal(got.permute(0, 3, 1, 2).double(), ref)


def test_fold_bn_matches_torch_batchnorm_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    bn = torch.nn.BatchNorm2d(19).eval()
    _randomize_bn(bn, g)
    x = torch.randn(3, 19, 5, 5, generator=g)
    a, b = fold_bn(bn)
    fma = (x.double() * a[:, None, None].double() + b[:, None, None].double()).float()  # one rounding
    assert torch.equal(bn(x), fma)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cin,cout,stride", [(16, 16, 1), (16, 32, 2), (16, 48, 2), (32, 64, 1), (7, 11, 2), (33, 33, 1),
                                             (21, 22, 1), (22, 22, 2), (43, 43, 1)])  # 3 taps in 1, 2 (split), 3 words
def test_fused_block_equals_torch_block_bit_for_bit(isa, cin, cout, stride):
    """The torch engine's eval-mode binary conv is the exact sum of signs times alpha (``quant.quantized_conv_exact``):
    the kernels' popcount sums times alpha, BatchNorm and residual add are the same float32 values."""
    g = torch.Generator().manual_seed(cin + cout)
    block = BasicBlock(cin, cout, stride, bits=1).eval()
    _randomize_bn(block, g)
    for q in (block.c1, block.c2):
        q.conv.weight.data = torch.randn(q.conv.weight.shape, generator=g)
    x = torch.randn(2, cin, 9, 9, generator=g)
    params, _ = binary_block_params({**binary_conv_state("blocks.0.c1", block.c1),
                                     **binary_conv_state("blocks.0.c2", block.c2)}, 0, cin, cout, stride)
    got = kernels.run_blocks(_nhwc(x), params, [cin, cout, stride], isa).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = block(x)
    assert got.shape == ref.shape
    assert torch.equal(got, ref)


def _random_binary_net(depth=14, edge_layers=8, exits=(4, 8), seed=0, edge_bits=1, **options):
    torch.manual_seed(seed)
    cfg = HybridConfig(depth=depth, edge_layers=edge_layers, edge_bits=edge_bits, exits=exits, **options)
    model = HybridNet(cfg).eval()
    _randomize_bn(model, torch.Generator().manual_seed(seed))
    for ex in model.exits.values():  # sharper exits so that a threshold splits the batch
        ex.fc.weight.data *= 30 if ex.hidden is None else 3000
    return model


def _thresholds(edge, x):
    """Per exit, midway between the two middle entropies of the samples that reach it (never on a sample's own
    value, where float rounding would decide): a mix of every exit and the cloud."""
    thr = []
    for j in range(len(edge.cfg.exits)):
        e = edge.decide(x, thr + [float("inf")] * (len(edge.cfg.exits) - j)).entropies[:, j]
        e = e[~e.isnan()].sort().values
        thr.append((e[len(e) // 2 - 1] + e[len(e) // 2]).item() / 2)
    return thr


@pytest.mark.parametrize("isa", [0, kernels.best_isa()])
def test_whole_packed_edge_decides_as_torch_engine(isa):
    model = _random_binary_net()
    edge, _ = model.split()
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)  # raw images
    thr = _thresholds(edge, x)
    ref = edge.decide(x, thr)
    got = PackedEdge.from_edge(edge, isa=isa).decide(x, thr)
    assert (ref.decided_at == 0).any() and (ref.decided_at == 1).any() and (ref.decided_at == CLOUD).any()
    assert torch.equal(got.decided_at, ref.decided_at)
    assert torch.equal(got.predictions, ref.predictions)
    assert torch.equal(got.remaining, ref.remaining)
    torch.testing.assert_close(got.entropies, ref.entropies, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got.features, ref.features, rtol=1e-4, atol=1e-4)


def test_packed_artifact_round_trip_and_size(tmp_path):
    model = _random_binary_net(depth=20, edge_layers=12, exits=(12,), seed=3)
    edge, _ = model.split()
    eng = PackedEdge.from_edge(edge)
    eng.save(tmp_path / "edge.safetensors")
    loaded = PackedEdge.load(tmp_path / "edge.safetensors")
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a, b = eng.decide(x, [0.5]), loaded.decide(x, [0.5])
    assert torch.equal(a.decided_at, b.decided_at) and torch.equal(a.features, b.features)
    binary_weights = sum(q.conv.weight.numel() for blk in edge.blocks for q in (blk.c1, blk.c2))
    bits = sum(v.numel() for k, v in export_state(edge).items() if k.endswith(".bits"))
    assert bits == sum((q.conv.weight.numel() + 7) // 8 for blk in edge.blocks for q in (blk.c1, blk.c2))
    assert bits * 8 < binary_weights + 8 * 2 * len(edge.blocks)  # one bit per weight, at most a byte's rounding each


def _randomize_options(module, gen):
    """Random RSign thresholds and RPReLU shifts/slopes (identity at initialization, which would test nothing)."""
    from hybridexit.model.quant import ChannelShift, RPReLU

    for m in module.modules():
        if isinstance(m, ChannelShift):
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.3
        elif isinstance(m, RPReLU):
            c = m.slope.numel()
            m.shift_in.data = torch.randn(c, generator=gen) * 0.3
            m.slope.data = torch.rand(c, generator=gen) * 1.5 - 0.25  # negative slopes too
            m.shift_out.data = torch.randn(c, generator=gen) * 0.3


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cin,cout,stride", [(16, 16, 1), (16, 32, 2), (7, 11, 2), (33, 33, 1)])
def test_fused_block_with_rsign_and_rprelu_equals_torch_block(isa, cin, cout, stride):
    g = torch.Generator().manual_seed(cin * cout)
    block = BasicBlock(cin, cout, stride, bits=1, act_shift=True, rprelu=True).eval()
    _randomize_bn(block, g)
    _randomize_options(block, g)
    for q in (block.c1, block.c2):
        q.conv.weight.data = torch.randn(q.conv.weight.shape, generator=g)
    x = torch.randn(2, cin, 9, 9, generator=g)
    state = {**binary_conv_state("blocks.0.c1", block.c1), **binary_conv_state("blocks.0.c2", block.c2)}
    assert {"blocks.0.c1.shift", "blocks.0.c2.rp_g", "blocks.0.c2.rp_b", "blocks.0.c2.rp_z"} <= set(state)
    params, meta = binary_block_params(state, 0, cin, cout, stride)
    got = kernels.run_blocks(_nhwc(x), params, meta, isa).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = block(x)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("isa", ISAS)
def test_rsign_threshold_folds_into_the_packing_exactly(isa):
    """sign(bn(x) - t) packed as bn(x) >= t: bit for bit what the torch layer computes, including values at t."""
    g = torch.Generator().manual_seed(7)
    c = 37
    x = torch.randn(3, c, 5, 5, generator=g)
    bn = torch.nn.BatchNorm2d(c).eval()
    _randomize_bn(bn, g)
    t = torch.randn(c, generator=g) * 0.3
    with torch.no_grad():
        z = bn(x)
    x[0, :, 0, 0] = 0.0
    t[:] = torch.where(torch.arange(c) % 2 == 0, t, bn(x)[0, :, 0, 0].detach())  # ties: bn(x) == t exactly
    a, b = fold_bn(bn)
    with torch.no_grad():
        want = (bn(x) - t.view(1, -1, 1, 1)) >= 0
    packed = kernels.sign_pack(_nhwc(x), a, b, t, isa)
    bits = torch.from_numpy(np.unpackbits(packed[:, 1:-1, 1:-1].contiguous().view(torch.uint8).numpy(),
                                          axis=-1, bitorder="little"))[..., :c].bool()
    assert torch.equal(bits, _nhwc(want.float()).bool())
    del z


OPTION_NETS = {
    "plain": {},
    "rsign+rprelu": {"act_shift": True, "rprelu": True, "ste": "approx"},
    "hidden-exit": {"exit_hidden": 24},
    "all-k2": {"act_shift": True, "rprelu": True, "exit_hidden": 16, "exit_pool": "k2"},
    "global": {"rprelu": True, "exit_pool": "global"},
    "k4": {"act_shift": True, "exit_pool": "k4"},
    "4-bit": {"edge_bits": 4},
    "2-bit-options": {"edge_bits": 2, "act_shift": True, "rprelu": True, "exit_hidden": 16},
    "4-bit-global": {"edge_bits": 4, "rprelu": True, "exit_pool": "global"},
}


# every option on this CPU's best kernels; three of them on every lower ISA level too
OPTION_CASES = [(o, kernels.best_isa()) for o in OPTION_NETS] + [
    (o, i) for o in ("plain", "all-k2", "4-bit") for i in range(min(kernels.best_isa(), 2))]


@pytest.mark.parametrize("option,isa", OPTION_CASES)
def test_every_recipe_option_decides_as_torch_in_one_native_call(option, isa):
    opts = OPTION_NETS[option]
    model = _random_binary_net(seed=11, **opts)
    _randomize_options(model, torch.Generator().manual_seed(12))
    edge, _ = model.split()
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(13))
    thr = _thresholds(edge, x)
    ref = edge.decide(x, thr)
    kbit = opts.get("edge_bits", 1) != 1  # k-bit blocks number their ISA levels apart (csrc/kbit.h)
    eng = PackedEdge.from_edge(edge, isa=min(isa, kernels.kbit_best_isa()) if kbit else isa)
    for images in (x, x.float() / 255):  # raw images and floats in [0, 1]
        got = eng.decide(images, thr)
        assert (ref.decided_at == 0).any() and (ref.decided_at == 1).any() and (ref.decided_at == CLOUD).any()
        assert torch.equal(got.decided_at, ref.decided_at)
        assert torch.equal(got.predictions, ref.predictions)
        assert torch.equal(got.remaining, ref.remaining)
        close = torch.isclose(got.entropies, ref.entropies, rtol=1e-4, atol=1e-5, equal_nan=True).all(1)
        fclose = (got.features - ref.features).abs().flatten(1).amax(1) <= 1e-4 + 1e-4 * ref.features.abs().flatten(1).amax(1)
        assert close.all() and fclose.all(), (close, fclose)
        # rounded-once stem, exact integer sums, torch's float32 epilogue: torch's features bit for bit
        assert torch.equal(got.features, ref.features)
    with torch.no_grad():
        same = torch.isclose(eng.forward(x), edge(x), rtol=1e-4, atol=1e-4).flatten(1).all(1)
    assert same.all()


def test_native_decision_with_temperatures_and_an_exit_at_the_last_edge_block():
    model = _random_binary_net(depth=14, edge_layers=8, exits=(8,), seed=4, exit_hidden=8)
    edge, _ = model.split()
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    temps = [1.7]
    e = edge.decide(x, [float("inf")], temps).entropies[:, 0].sort().values
    thr = [(e[7] + e[8]).item() / 2]
    ref, got = edge.decide(x, thr, temps), PackedEdge.from_edge(edge).decide(x, thr, temps)
    assert torch.equal(got.decided_at, ref.decided_at) and torch.equal(got.remaining, ref.remaining)
    torch.testing.assert_close(got.features, ref.features, rtol=1e-4, atol=1e-4)
    none = PackedEdge.from_edge(edge).decide(x, [float("inf")])  # every sample exits: no features left
    assert none.features.shape == (0, *edge.feature_shape) and none.remaining.numel() == 0


def test_packed_engine_runs_every_option_and_refuses_what_it_cannot():
    from hybridexit.engines import available_engines

    cfg = HybridConfig(depth=14, edge_layers=4, edge_bits=1, exits=(4,), rprelu=True, act_shift=True, exit_hidden=8)
    assert "packed" in available_engines(cfg)
    with pytest.raises(EngineError, match="32-bit"):
        PackedEdge.from_edge(HybridNet(HybridConfig(depth=14)).split()[0])


def test_cli_export_and_evaluate_on_every_engine(tmp_path, tiny_cifar, capsys):
    import json

    from hybridexit.cli import main
    from hybridexit.data import load_cifar
    from hybridexit.engines import available_engines
    from hybridexit.model.checkpoint import save_model

    model = _random_binary_net()
    ck = str(tmp_path / "ck")
    save_model(ck, model, {"data": {"name": "cifar10"}})
    images = load_cifar("cifar10", tiny_cifar).test.images
    thr = [f"{t:.9g}" for t in _thresholds(model.split()[0], images)]
    assert main(["export", ck, "--format", "packed", "--out", str(tmp_path / "x")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["edge_bytes"] < exported["edge_float_bytes"] / 2  # float exit heads dominate this tiny edge
    assert PackedEdge.load(tmp_path / "x" / "edge.packed.safetensors").cfg == model.cfg
    recs = {}
    for engine in available_engines(model.cfg):
        out = tmp_path / f"{engine}.jsonl"
        assert main(["evaluate", ck, "--data-dir", str(tiny_cifar), "--thresholds", *thr, "--engine", engine,
                     "--json", "--out", str(out)]) == 0
        assert json.loads(capsys.readouterr().out)["engine"] == engine
        recs[engine] = [(r["decided_at"], r["prediction"]) for r in map(json.loads, out.read_text().splitlines())]
    assert len({r[0] for r in recs["torch"]}) == 3  # exit 0, exit 1 and cloud all occur
    for engine, r in recs.items():
        assert r == recs["torch"], engine


def test_edge_runtime_on_packed_engine_sends_the_same_records(tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_runtime import TOKEN, ThreadServer

    from hybridexit.data import Inputs
    from hybridexit.model.checkpoint import save_model
    from hybridexit.model.policy import ExitPolicy, write_policy
    from hybridexit.runtime.client import EdgeOptions, run_edge
    from hybridexit.runtime.server import ServerSettings

    model = _random_binary_net()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    ck = tmp_path / "ck"
    save_model(ck, model, {"data": {"name": "cifar10", "classes": [f"c{i}" for i in range(10)]}})
    write_policy(ck, ExitPolicy(tuple(_thresholds(model.split()[0], images))))
    srv = ThreadServer(ck, ServerSettings(max_batch=8, max_wait_ms=2, token=TOKEN))
    try:
        recs = {engine: run_edge(ck, Inputs(images, torch.zeros(16, dtype=torch.long)),
                                 EdgeOptions(srv.url, token=TOKEN, batch_size=4, engine=engine))[1]
                for engine in ("torch", "packed")}
    finally:
        srv.stop()
    assert {r["decided_at"] for r in recs["torch"]} == {"exit:0", "exit:1", "cloud"}
    for got, want in zip(recs["packed"], recs["torch"]):
        assert (got["decided_at"], got["prediction"]) == (want["decided_at"], want["prediction"])
        assert got["entropies"] == pytest.approx(want["entropies"], rel=1e-4, abs=1e-5)


def test_a_build_killed_midway_does_not_hang_the_next_load(tmp_path):
    """torch's build lock left by a killed build (a plain file) made every later load wait forever."""
    import subprocess
    import sys

    from hybridexit.engines.native import _build_dir

    (_build_dir() / "lock").write_text("")  # what a build killed while compiling leaves
    code = "from hybridexit.engines.native import kernels; print(kernels().isa_name(0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert not (_build_dir() / "lock").exists()


@pytest.mark.parametrize("isa", sorted({0, kernels.best_isa()}))
@pytest.mark.parametrize("width,edge_bits", [(7, 1), (8, 4), (24, 1), (48, 2)])
def test_stem_of_any_width_is_the_torch_engines_bit_for_bit(width, edge_bits, isa):
    """The native stem sums in float64 and rounds once (as ``quant.RoundedOnceConv2d``) with 1 to 8 vectors of output
    channels in registers or the portable loop (7: no whole vector): the edge's features equal torch's bit for bit."""
    model = _random_binary_net(depth=8, edge_layers=2, exits=(2,), seed=width, edge_bits=edge_bits, width=width)
    edge, _ = model.split()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(width))
    kbit = edge_bits != 1
    eng = PackedEdge.from_edge(edge, isa=min(isa, kernels.kbit_best_isa()) if kbit else isa)
    got = eng.decide(x, [0.0])  # the native call (normalization, stem, blocks); threshold 0: every sample stays
    assert got.remaining.tolist() == [0, 1, 2]
    with torch.no_grad():
        assert torch.equal(got.features, edge(x))
