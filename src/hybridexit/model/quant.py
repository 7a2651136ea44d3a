"""Quantizers for the edge half, after Long et al. (2020), Eq. (1)-(3), and XNOR-Net (Rastegari et al., 2016).

Every quantizer is a small function with its math and its gradient estimator, and the modules that use them
carry a ``bits`` attribute that the energy model reads (1 = binary, k = k-bit uniform, 32 = float).

Activations (Eq. 1), after the BatchNorm that precedes every quantized conv:
    binary:  I_B = sign(I)                      in {-1, +1}
    k-bit:   I_Q = 2 * round((clip(I, -1, 1) + 1) / 2 * Z) / Z - 1,   Z = 2^k - 1
             i.e. v0 = 1, v1 = 2, v2 = 1/2 in the paper's notation: 2^k levels evenly spread over [-1, 1].
Weights (Eq. 2, 3), per output channel c:
    binary:  W_B = alpha_c * sign(W),  alpha_c = mean |W[c]|        (XNOR-Net)
    k-bit:   W_Q = s_c * Q_k(W / s_c),  s_c = max |W[c]|              (2^k levels in [-s_c, s_c])
Gradients: straight-through estimator clipped to |x| <= 1 (Hubara et al., 2016): dQ/dx = 1 if |x| <= 1 else 0.
For weights the scale is treated as a constant; the clip is taken on W / s (always inside [-1, 1] for k-bit).

Binary-edge recipe options (issue 21; each off by default, which is the paper's plain XNOR layer above):
- ``ste="approx"``: Bi-Real Net's ApproxSign (Liu et al., 2018) for binary activations: forward sign(x), backward
  the derivative of the piecewise polynomial 2x + x^2 (x < 0) / 2x - x^2 (x >= 0) on [-1, 1], i.e. 2 - 2|x|
  for |x| <= 1 and 0 outside. Weights keep the clipped estimator.
- ``act_shift``: ReActNet's RSign (Liu et al., 2020): a learnable per-channel threshold b_c before the activation
  quantizer, sign(x - b_c) (``ChannelShift``).
- ``rprelu``: ReActNet's RPReLU: learnable per-channel shifts and slope after the quantized conv,
  PReLU_beta(x - gamma_c) + zeta_c (``RPReLU``); it starts as the identity (gamma = zeta = 0, beta = 1) so that a
  network initialized from a checkpoint without it computes the same function at step 0.
- Two-stage training (binary activations with float weights first): ``QuantConv2d.float_weights``, switched by
  ``set_float_weights`` for the first stage of a schedule (``train.TrainConfig.stage1_epochs``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

SUPPORTED_BITS = (1, 2, 4, 8, 32)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"unsupported bit width {bits!r}: use one of {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


class _SignSTE(torch.autograd.Function):
    """sign(x) with sign(0) = +1; backward passes the gradient where |x| <= 1.

    Saves a boolean mask (1 byte per element) rather than x, and uses scalar ``where``: this keeps the extra
    memory passes of a binary layer to a minimum on CPU, where they dominate the cost over a float layer."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x.abs() <= 1)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside


class _UniformSTE(torch.autograd.Function):
    """2^k-level uniform quantizer on [-1, 1] (Eq. 1/3); backward passes the gradient where |x| <= 1."""

    @staticmethod
    def forward(ctx, x, bits: int):
        ctx.save_for_backward(x.abs() <= 1)
        z = float(2**bits - 1)
        return torch.round((x.clamp(-1.0, 1.0) + 1.0) * (z / 2.0)) * (2.0 / z) - 1.0

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


class _ApproxSignSTE(torch.autograd.Function):
    """sign(x) with sign(0) = +1; backward Bi-Real's ApproxSign derivative 2 - 2|x| on |x| <= 1, 0 outside."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * x.abs()).clamp_min(0.0)


STES = ("clip", "approx")


def check_ste(ste: str) -> str:
    if ste not in STES:
        raise ConfigError(f"ste={ste!r}: use clip (clipped straight-through) or approx (Bi-Real ApproxSign)")
    return ste


def approx_sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binary activation: sign with Bi-Real's ApproxSign gradient."""
    return _ApproxSignSTE.apply(x)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binary activation: sign with a clipped straight-through gradient."""
    return _SignSTE.apply(x)


def uniform_ste(x: torch.Tensor, bits: int) -> torch.Tensor:
    """k-bit uniform activation on [-1, 1] with a clipped straight-through gradient."""
    return _UniformSTE.apply(x, bits)


def quantize_activation(x: torch.Tensor, bits: int, ste: str = "clip") -> torch.Tensor:
    if bits == 32:
        return F.relu(x)
    if bits == 1:
        return approx_sign_ste(x) if ste == "approx" else sign_ste(x)
    return uniform_ste(x, bits)


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize a conv/linear weight per output channel (dim 0)."""
    if bits == 32:
        return w
    dims = tuple(range(1, w.dim()))
    if bits == 1:
        alpha = w.abs().mean(dim=dims, keepdim=True).detach()
        return sign_ste(w) * alpha
    scale = w.abs().amax(dim=dims, keepdim=True).detach().clamp_min(1e-8)
    return uniform_ste(w / scale, bits) * scale


def weight_levels(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, s): a k-bit conv weight's level indices r in 0..Z (Z = 2^k - 1; float32, W's shape) and its per-output-channel
    scales s = max |W[c]| (float32, flat), with ``quantize_weight``'s float32 operations, so that its quantized weight is
    exactly ``(r * (2 / Z) - 1) * s`` and its integer levels are 2r - Z. What the engines' k-bit weights are made of."""
    z = float(2**bits - 1)
    w = w.detach().float()
    s = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-8)
    return torch.round(((w / s).clamp(-1.0, 1.0) + 1.0) * (z / 2.0)), s.flatten().contiguous()


class ActQuantizer(nn.Module):
    """Activation function of a conv: ReLU for float (bits=32), sign (1) or k-bit uniform otherwise."""

    def __init__(self, bits: int = 32, ste: str = "clip"):
        super().__init__()
        self.bits = check_bits(bits)
        self.ste = check_ste(ste)

    def forward(self, x):
        # quantized levels from FP32 (a no-op outside bf16 autocast): a bf16 input gives the same sign, and k-bit
        # levels stay the exact FP32 ones
        return quantize_activation(x if self.bits == 32 else x.float(), self.bits, self.ste)

    def extra_repr(self):
        return f"bits={self.bits}" + (f", ste={self.ste}" if self.ste != "clip" else "")


class QuantConv2d(nn.Conv2d):
    """Conv2d whose weights are quantized to ``bits`` on every forward (the float weights are the latent ones).

    ``float_weights = True`` (set by ``set_float_weights``, never saved) uses the latent float weights as they are:
    the first stage of two-stage training. ``levels_in``: its input is always an activation quantizer's output at
    the same ``bits`` (``BNQuantConv``); then eval mode computes the exact integer sum (``quantized_conv_exact``)."""

    float_weights = False

    def __init__(self, *args, bits: int = 1, levels_in: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.bits = check_bits(bits)
        self.levels_in = levels_in

    def forward(self, x):
        if self.levels_in and not self.training and not self.float_weights:
            return quantized_conv_exact(x, self)
        w = self.weight if self.float_weights else quantize_weight(self.weight, self.bits)
        if torch.is_autocast_enabled(x.device.type):  # bf16 training: the quantized products and sums stay FP32
            with torch.autocast(x.device.type, enabled=False):
                return self._conv_forward(x.float(), w.float(), None if self.bias is None else self.bias.float())
        return self._conv_forward(x, w, self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", bits={self.bits}"


class RoundedOnceConv2d(nn.Conv2d):
    """A float conv whose eval-mode output is its exact sum rounded once to float32: computed in float64 (every
    product of two float32 numbers is exact there, the sum's error is ~2^-29 of a float32 step) and rounded at the
    end. Float32 sums in another order (oneDNN's, ONNX Runtime's, a kernel's vector lanes, a batch size) move the
    result by a float32 step now and then, and a quantizer after it (a sign, a 2^k-level rounding) turns that step
    into another level on values that sit on a boundary, which then spreads through the layers after it. Rounded
    once, the stem is the same float32 value in every engine that computes it this way (the packed kernels' stem,
    ``onnx_export``'s float64 stem), whatever the order; training (train mode) keeps the float32 conv. The stem of
    every quantized edge (the float stem is small: 27 products per output value)."""

    def forward(self, x):
        if self.training or x.dtype == torch.float64:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.double()
            return self._conv_forward(x.double(), self.weight.double(), bias).to(x.dtype)


def set_float_weights(model: nn.Module, on: bool) -> None:
    """Two-stage training: every quantized conv of ``model`` uses its latent float weights (``on``) or quantizes
    them (off, the default)."""
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            m.float_weights = bool(on)


class ChannelShift(nn.Module):
    """ReActNet's RSign threshold: x - b_c, one learnable b per channel, before the activation quantizer.
    The energy model counts one 32-bit add per element (module type, see ``energy.count_layers``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x - self.bias.view(1, -1, 1, 1)


class RPReLU(nn.Module):
    """ReActNet's RPReLU after a quantized conv: PReLU_beta(x - gamma_c) + zeta_c, per-channel gamma, beta, zeta.
    Identity at initialization. The energy model counts, per element, the shift as one 32-bit add and
    beta * (x - gamma) + zeta as one 32-bit MAC (module type, see ``energy.count_layers``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.ones(channels))
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return F.prelu(x - self.shift_in.view(1, -1, 1, 1), self.slope) + self.shift_out.view(1, -1, 1, 1)


class BNQuantConv(nn.Module):
    """The paper's QuanConv (Fig. 2): BatchNorm -> activation quantizer -> conv with quantized weights.

    With ``bits=32`` the same module is a pre-activation float conv (BatchNorm -> ReLU -> conv), with the same
    parameter names, so a float checkpoint initializes a quantized one key for key. Recipe options of quantized
    convs (module docstring): ``act_shift`` (RSign: BatchNorm -> shift -> quantizer), ``rprelu`` (conv -> RPReLU),
    ``ste``. Off, the modules are absent: the state dict and the arithmetic are the plain layer's.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, bits: int = 32, act_shift: bool = False,
                 rprelu: bool = False, ste: str = "clip"):
        super().__init__()
        self.bits = check_bits(bits)
        if bits == 32 and (act_shift or rprelu or ste != "clip"):
            raise ConfigError("act_shift, rprelu and ste are options of quantized convs, not of float ones")
        self.bn = nn.BatchNorm2d(in_ch)
        self.shift = ChannelShift(in_ch) if act_shift else None
        self.act = ActQuantizer(bits, ste)
        if bits == 32:
            self.conv = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        else:
            self.conv = QuantConv2d(in_ch, out_ch, 3, stride, 1, bias=False, bits=bits, levels_in=True)
        self.rprelu = RPReLU(out_ch) if rprelu else None

    def forward(self, x):
        x = self.bn(x)
        if self.shift is not None:
            x = self.shift(x)
        x = self.conv(self.act(x))
        return x if self.rprelu is None else self.rprelu(x)


def quantized_conv_exact(x: torch.Tensor, conv: QuantConv2d) -> torch.Tensor:
    """``conv`` (eval mode) of quantized activations ``x`` (an ``ActQuantizer``'s output at ``conv.bits``) on the
    integer levels: the exact integer sum S of the activation and weight levels over the valid taps (zero padding
    contributes 0), then one float32 multiply by the channel's scale. Binary: a = x = sign(z), w = sign(W) in
    {-1, +1}, scale alpha_c = mean |W[c]|; k-bit: a = Z x = 2q - Z (x = (2q - Z) / Z up to float rounding, so the
    rounded product is exact), w = 2r - Z, scale m_c = s_c / Z^2 (rounded once from float64). The same real number
    as the STE path's float conv of the quantized values (training); computed this way its float32 value no longer
    depends on the order of the sums (oneDNN's, a GPU's, a batch size's), and it is the value the integer engines
    compute (``engines``: popcounts, int8 dot products), so they all decide as this reference does.

    S is exact: float32 holds every integer up to 2^24, and the largest sum, 9 C (binary) or 9 C Z^2 (per group),
    stays below that for every binary layer, every 2- and 4-bit layer up to 8,285 input channels (wider, or 8-bit
    past 28 channels, the sum runs in float64: exact to 2^53); the result is rounded to the nearest integer, which
    also undoes an inexact conv algorithm's error (< 0.5)."""
    weight = conv.weight.detach()
    dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32  # float64 stays float64
    fan_in = weight[0].numel()
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(dtype)
        if conv.bits == 1:  # x is sign(z): +-1 exactly
            a, w = x, torch.where(weight >= 0, 1.0, -1.0).to(dtype)
            scale, top = weight.float().abs().mean(dim=tuple(range(1, weight.dim()))).to(dtype), fan_in
        else:
            zz = float(2**conv.bits - 1)
            r, s = weight_levels(weight, conv.bits)
            a, w = torch.round(x * zz), (r * 2.0 - zz).to(dtype)
            scale, top = (s.double() / (zz * zz)).to(dtype), fan_in * zz * zz
        if top > 2**24:
            a, w = a.double(), w.double()
        acc = F.conv2d(a, w, None, conv.stride, conv.padding, conv.dilation, conv.groups).round_()
        y = (acc if acc.dtype == dtype else acc.to(dtype)).mul_(scale.view(1, -1, 1, 1))
        return y if conv.bias is None else y.add_(conv.bias.detach().to(dtype).view(1, -1, 1, 1))
