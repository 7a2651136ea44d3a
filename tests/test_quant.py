import copy

import pytest
import torch

from hybridexit.errors import ConfigError
from hybridexit.model.quant import BNQuantConv, QuantConv2d, quantize_activation, quantize_weight, sign_ste, uniform_ste


def test_binary_weight_is_plus_minus_alpha_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    q = quantize_weight(w, 1)
    alpha = w.abs().mean(dim=(1, 2, 3))
    for c in range(8):
        vals = set(torch.unique(q[c]).tolist())
        assert vals <= {alpha[c].item(), -alpha[c].item()}
        assert len(vals) == 2
    assert torch.equal(torch.sign(q), torch.where(w >= 0, 1.0, -1.0))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kbit_activation_has_exactly_2k_levels(bits):
    x = torch.linspace(-3, 3, 100_001)
    q = quantize_activation(x, bits)
    levels = torch.unique(q)
    assert len(levels) == 2**bits
    assert levels.min() == -1 and levels.max() == 1
    step = torch.diff(levels)
    assert torch.allclose(step, torch.full_like(step, 2 / (2**bits - 1)), atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_kbit_weight_levels_per_channel(bits):
    torch.manual_seed(1)
    w = torch.randn(4, 16, 3, 3) * torch.tensor([0.1, 1.0, 3.0, 0.01]).view(4, 1, 1, 1)
    q = quantize_weight(w, bits)
    for c in range(4):
        s = w[c].abs().max()
        levels = torch.unique(q[c] / s)
        assert len(levels) <= 2**bits
        expected = torch.linspace(-1, 1, 2**bits)
        assert all(torch.isclose(expected, v, atol=1e-5).any() for v in levels)


def test_binary_activation_values_and_ste_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.backward(torch.arange(1.0, 8.0))
    # gradient passes where |x| <= 1, zero outside
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 0]


def test_kbit_ste_gradient_clipped():
    x = torch.tensor([-1.5, -0.3, 0.9, 1.0, 1.01], requires_grad=True)
    uniform_ste(x, 2).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


def test_weight_ste_reaches_latent_weights():
    conv = QuantConv2d(2, 3, 3, bits=1, bias=False)
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_quanconv_order_and_bits():
    m = BNQuantConv(4, 8, 1, bits=2)
    assert [type(c).__name__ for c in m.children()] == ["BatchNorm2d", "ActQuantizer", "QuantConv2d"]
    assert m.conv.bits == 2 and m.act.bits == 2
    assert BNQuantConv(4, 8, 1, bits=32).conv.__class__ is torch.nn.Conv2d


def test_unsupported_bits_rejected():
    with pytest.raises(ConfigError, match="use one of 1, 2, 4, 8, 32"):
        BNQuantConv(4, 4, bits=3)


@pytest.mark.parametrize("bits,cin,stride", [(2, 16, 1), (4, 7, 2), (4, 64, 1), (8, 33, 2)])
def test_eval_kbit_conv_is_the_exact_sum_rounded_once_whatever_the_batch(bits, cin, stride):
    """Eval mode: the exact integer sum of the levels times s_c / Z^2, one float32 rounding (``quantized_conv_exact``):
    the float64 value rounded, the same bits for an image alone as inside a batch; train mode is the STE conv of
    the quantized values (to float rounding the same number), with gradients to the latent weights."""
    import torch.nn.functional as F

    from hybridexit.model.quant import quantized_conv_exact, weight_levels

    g = torch.Generator().manual_seed(bits * cin)
    q = BNQuantConv(cin, 12, stride, bits)
    q.conv.weight.data = torch.randn(q.conv.weight.shape, generator=g)
    x = torch.randn(6, cin, 9, 9, generator=g)
    q.train()
    q(x).sum().backward()
    assert q.conv.weight.grad is not None and q.conv.weight.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        y = q(x)
        z = q.bn(x)
        zz = 2**bits - 1
        a = 2 * torch.round((z.clamp(-1.0, 1.0) + 1.0) * (zz / 2.0)).double() - zz
        r, s = weight_levels(q.conv.weight, bits)
        acc = F.conv2d(a, 2 * r.double() - zz, stride=stride, padding=1)
        assert torch.equal(y, acc.float() * (s.double() / zz**2).float().view(1, -1, 1, 1))
        assert all(torch.equal(q(x[i : i + 1]), y[i : i + 1]) for i in range(len(x)))
        assert torch.equal(quantized_conv_exact(q.act(z), q.conv), y)
        torch.testing.assert_close(y, q.conv(q.act(z)), rtol=1e-4, atol=1e-4)  # the STE path's float32 conv
        assert copy.deepcopy(q).double()(x.double()).dtype == torch.float64  # a float64 network stays float64


def test_rounded_once_stem_is_float64_rounded_and_batch_invariant():
    from hybridexit import HybridConfig, HybridNet
    from hybridexit.model.quant import RoundedOnceConv2d

    assert type(HybridNet(HybridConfig(depth=8, edge_layers=2, edge_bits=32, exits=(2,))).stem) is torch.nn.Conv2d
    stem = HybridNet(HybridConfig(depth=8, edge_layers=2, edge_bits=4, exits=(2,))).stem
    assert isinstance(stem, RoundedOnceConv2d)  # every quantized edge's stem; the state dict is a Conv2d's
    assert list(stem.state_dict()) == ["weight"]
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    stem.eval()
    with torch.no_grad():
        y = stem(x)
        ref = torch.nn.functional.conv2d(x.double(), stem.weight.double(), padding=1).float()
        assert torch.equal(y, ref)
        assert all(torch.equal(stem(x[i : i + 1]), y[i : i + 1]) for i in range(len(x)))
        stem.train()
        torch.testing.assert_close(stem(x), y, rtol=1e-5, atol=1e-5)  # training: the float32 conv


def test_eval_exact_conv_keeps_a_bias_and_groups():
    """A ``QuantConv2d`` fed quantizer output (``levels_in``) with a bias and groups: eval mode is the STE path's
    value to float rounding (the exact sum scaled once, then the bias)."""
    from hybridexit.model.quant import ActQuantizer, QuantConv2d

    g = torch.Generator().manual_seed(9)
    for bits in (1, 4):
        conv = QuantConv2d(8, 6, 3, 1, 1, groups=2, bias=True, bits=bits, levels_in=True)
        conv.weight.data = torch.randn(conv.weight.shape, generator=g)
        conv.bias.data = torch.randn(6, generator=g)
        x = ActQuantizer(bits)(torch.randn(2, 8, 7, 7, generator=g))
        with torch.no_grad():
            exact = conv.eval()(x)
            ste = conv.train()(x)
        torch.testing.assert_close(exact, ste, rtol=1e-5, atol=1e-5)
