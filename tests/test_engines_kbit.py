"""The k-bit integer kernels (csrc/kbit.cpp, engines/kbit.py): exact integer sums and fused blocks vs torch."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

# the packed engine's tests build (or skip on) the one native module both engines' kernels live in
from test_engines_packed import _nhwc, kernels  # noqa: E402

from hybridexit.engines.kbit import (
    kbit_block_params,
    kbit_state,
    kconv_params,
    kernel_kweights,
    pack_levels,
    unpack_levels,
)
from hybridexit.errors import EngineError
from hybridexit.model.hybrid import HybridNet
from hybridexit.model.quant import quantize_weight, weight_levels
from hybridexit.model.resnet import BasicBlock, HybridConfig

ISAS = list(range(kernels.kbit_best_isa() + 1))
SHAPES = [(16, 16, 8, 1), (3, 5, 7, 1), (17, 33, 9, 2), (64, 8, 4, 2), (70, 65, 5, 1), (32, 64, 6, 2), (1, 1, 1, 1),
          (5, 3, 2, 2), (150, 20, 3, 1)]


def _levels_and_reference(bits, cin, cout, size, stride, seed):
    g = torch.Generator().manual_seed(seed)
    z = 2**bits - 1
    q = torch.randint(0, z + 1, (2, cin, size, size), generator=g)
    r = torch.randint(0, z + 1, (cout, cin, 3, 3), generator=g)
    q[0, :, 0, 0], r[0, 0] = 0, z  # the extreme levels
    w = 2 * r - z
    # zero padding, as in training: a padded tap contributes 0 (which is not a level)
    ref = F.conv2d((2 * q - z).double(), w.double(), stride=stride, padding=1)
    return _nhwc((2 * q).to(torch.uint8)), w, ref.permute(0, 2, 3, 1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("cin,cout,size,stride", SHAPES)
def test_kconv_equals_torch_integer_sums(isa, bits, cin, cout, size, stride):
    u, w, ref = _levels_and_reference(bits, cin, cout, size, stride, cin * 100 + cout + bits)
    wk, wbias = kernel_kweights(w, bits)
    got = kernels.kconv_int(u, wk, wbias, cout, bits, stride, isa)
    assert got.dtype == torch.int32
    assert torch.equal(got.double(), ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("cin,cout,size,stride", SHAPES[1:5])
def test_bitserial_alternative_gives_the_same_exact_sums(isa, bits, cin, cout, size, stride):
    u, w, ref = _levels_and_reference(bits, cin, cout, size, stride, cin + cout * 7 + bits)
    got = kernels.kconv_bitserial_int(u, w.permute(0, 2, 3, 1).contiguous().to(torch.int8), bits, stride, isa)
    assert torch.equal(got.double(), ref)


@pytest.mark.parametrize("bits", [2, 4])
def test_weight_levels_are_the_trained_quantizer_and_pack_losslessly(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(7, 5, 3, 3, generator=g)
    w[3] = 0.0  # an all-zero channel: scale clamped as in training
    r, s = weight_levels(w, bits)
    z = 2**bits - 1
    assert r.min() >= 0 and r.max() <= z
    torch.testing.assert_close(s[:, None, None, None] * (2 * r - z) / z, quantize_weight(w, bits), rtol=1e-6, atol=1e-7)
    packed = pack_levels(r, bits)
    assert packed.numel() == (w.numel() * bits + 7) // 8
    assert torch.equal(unpack_levels(packed, r.shape, bits), r.long())


def _randomize(module, gen):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.randn(c, generator=gen) * 2  # negative scales too
            m.bias.data = torch.randn(c, generator=gen) * 0.3
            m.running_mean.data = torch.randn(c, generator=gen) * 0.3
            m.running_var.data = torch.rand(c, generator=gen) + 0.5
        elif type(m).__name__ == "ChannelShift":
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.2
        elif type(m).__name__ == "RPReLU":
            m.shift_in.data = torch.randn(m.shift_in.shape, generator=gen) * 0.1
            m.slope.data = torch.rand(m.slope.shape, generator=gen)
            m.shift_out.data = torch.randn(m.shift_out.shape, generator=gen) * 0.1


OPTIONS = [{}, {"act_shift": True}, {"rprelu": True}, {"act_shift": True, "rprelu": True}]


@pytest.mark.parametrize("isa,opts", [(i, OPTIONS[3]) for i in ISAS] + [(ISAS[-1], o) for o in OPTIONS[:3]],
                         ids=[f"isa{i}-both" for i in ISAS] + [f"isa{ISAS[-1]}-{n}" for n in ("plain", "rsign", "rprelu")])
@pytest.mark.parametrize("bits,cin,cout,stride", [(4, 16, 16, 1), (2, 16, 32, 2), (4, 7, 11, 2), (2, 33, 33, 1),
                                                  (4, 32, 64, 2)])
def test_fused_block_equals_torch_block_bit_for_bit(isa, opts, bits, cin, cout, stride):
    """The torch engine's eval-mode k-bit conv is the exact integer sum times s_c / Z^2 (``quant.quantized_conv_exact``),
    BatchNorm one fused multiply-add, RPReLU and the residual add the same float32 operations: the kernels compute
    the same float32 values, on every ISA."""
    g = torch.Generator().manual_seed(cin + cout + bits)
    block = BasicBlock(cin, cout, stride, bits, **opts).eval()
    _randomize(block, g)
    for q in (block.c1, block.c2):
        q.conv.weight.data = torch.randn(q.conv.weight.shape, generator=g)
    x = torch.randn(2, cin, 9, 9, generator=g)
    state = kbit_state(SimpleNamespace(cfg=SimpleNamespace(edge_bits=bits), blocks=[block]))
    on = {"act_shift": False, "rprelu": False} | opts
    params = (kconv_params(state, "blocks.0.c1", cin, cout, bits, **on)
              + kconv_params(state, "blocks.0.c2", cout, cout, bits, **on))
    got = kernels.run_kblocks(_nhwc(x), params, [cin, cout, stride, bits], isa).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = block(x)
    assert got.shape == ref.shape
    assert torch.equal(got, ref)


@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "rsign", "rprelu", "both"])
@pytest.mark.parametrize("bits", [2, 4])
def test_run_of_edge_blocks_equals_torch_edgenet(opts, bits):
    # ResNet-14 with 8 edge layers: 4 k-bit blocks across a stride-2 stage boundary, run in one call
    cfg = HybridConfig(depth=14, edge_layers=8, edge_bits=bits, exits=(8,), width=8, **opts)
    torch.manual_seed(bits)
    model = HybridNet(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(bits))
    edge, _ = model.split()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = edge.stem(edge.normalize(x))
        ref = h
        for block in edge.blocks:
            ref = block(ref)
    params, meta = kbit_block_params(kbit_state(edge), cfg)
    assert meta == [8, 8, 1, bits, 8, 8, 1, bits, 8, 16, 2, bits, 16, 16, 1, bits]
    for isa in (0, ISAS[-1]):
        got = kernels.run_kblocks(_nhwc(h), params, meta, isa).permute(0, 3, 1, 2)
        assert torch.equal(got, ref)


def test_kbit_export_refuses_other_bit_widths_and_bad_arguments():
    edge, _ = HybridNet(HybridConfig(depth=8, edge_layers=2, edge_bits=1, exits=(2,))).split()
    with pytest.raises(EngineError, match="2- and 4-bit"):
        kbit_state(edge)
    cfg = HybridConfig(depth=8, edge_layers=2, edge_bits=4, exits=(2,))
    edge, _ = HybridNet(cfg).split()
    params, meta = kbit_block_params(kbit_state(edge), cfg)
    with pytest.raises(EngineError, match="blocks"):
        kbit_block_params(kbit_state(edge), cfg, 0, 2)
    x = torch.zeros(1, 8, 8, 16)
    with pytest.raises(RuntimeError, match="18 tensors"):
        kernels.run_kblocks(x, params[:-1], meta, -1)
    with pytest.raises(RuntimeError, match="bits must be 2 or 4"):
        kernels.run_kblocks(x, params, meta[:3] + [3], -1)
