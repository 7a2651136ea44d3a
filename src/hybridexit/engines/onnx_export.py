"""Export the two halves as ONNX graphs, built node by node (``onnx.helper``) so every node is the one we chose.

Edge (``edge.onnx``): input ``images`` uint8 (N, C, H, W), raw; the network's normalization (``x / 255``, then
``(x - mean) / std``), the float stem (a quantized edge's summed in float64 and rounded once, as
``quant.RoundedOnceConv2d``: shifted copies, ``MatMul`` in float64), the residual blocks, every exit head, and
outputs ``logits_j`` and ``entropy_j`` (softmax entropy, natural log, temperature 1) per exit and ``features``
(the residual stream after the last edge block, every sample: the graph takes no exits itself; the engine applies
the exit rule).
Cloud (``cloud.onnx``): input ``features``, the float blocks and the final head, output ``logits``.

Every network the trainer makes is exported (edge bits 1, 2, 4, 8 or 32, every recipe option):

- A quantized conv is ``BNQuantConv``'s chain: BatchNorm with the folded terms, RSign's threshold as a per-channel
  ``Sub`` (as torch computes it, after the BatchNorm), the activation quantizer, the conv, then RPReLU as ``Sub``,
  ``PRelu``, ``Add`` (before the residual ``Add``, as in torch). PyTorch's CPU BatchNorm is one fused multiply-add
  per element (``folding.fold_bn``) and ONNX has no such operator; before a quantizer the graph computes it as
  ``Cast`` to float64, ``Mul``, ``Add``, ``Cast`` back: the product of two float32 numbers is exact in float64, so
  the result is the fused multiply-add's except when the float64 sum lands exactly on a float32 rounding midpoint
  (about one value in 2^29). A float32 ``Mul`` then ``Add`` rounds twice and moves a value by one float32 step now
  and then, which is enough to move a quantizer level when the value sits on a boundary (measured: 4 of 5,000
  validation decisions of the 4-bit headline). Float convs' BatchNorms (exit heads, the cloud) keep float32.
- **Binary conv**: ``QLinearConv`` on uint8 activations with zero point 1 (sign(x) = -1 -> 0, +1 -> 2; the padding
  value, the zero point, is exactly the 0 of training's zero padding) and int8 weights +-1, then the per-channel
  scale alpha in float. Its int32 sum is requantized to uint8 with scale ``s`` and zero point 128: ``s = 1`` when
  the fan-in 9 C is at most 127 (exact), else ``s = 2``: exact for even sums in [-256, 254] (a binary sum has the
  parity of its fan-in 9 C, so even for even C), saturated beyond, within one step (rounded half to even) for odd
  sums.
- **k-bit conv** (Z = 2^k - 1). The quantizer's level index q = round((clip(z, -1, 1) + 1) * Z / 2) in 0..Z comes
  from torch's own float32 operations (``Clip``, ``Add``, ``Mul``, ``Round``: half to even, as ``torch.round``), so
  q is torch's whenever z is; the weight level index r (0..Z, from W / max|W[c]| as ``quant.quantize_weight``
  computes it) is stored as uint8 with the scale s_c. The conv is the exact integer sum S of the levels a = 2q - Z
  and w = 2r - Z over the valid taps (padding contributes 0, which is not a level), then ``S * m_c`` with
  m_c = s_c / Z^2 in float32: what the torch engine computes in eval mode (``quant.quantized_conv_exact``) and the
  packed engine's kernels compute, so the engines decide alike (``benchmarks/engine_agreement.py``; a k-bit
  network's decisions follow its arithmetic closely: a 4-bit quantizer has 2^k - 1 rounding points in [-1, 1], and
  one level flipped by a rounding difference changes the next layer's inputs enough to flip more, so float sums in
  another order, as oneDNN's, disagreed on 2.8 % of the 4-bit headline's test images before the torch engine
  computed S too). ``QLinearConv`` cannot hold S: it requantizes its output to 8 bits, and S spans up to
  2 * 9 C Z^2 + 1 values (2-bit: 2,593 at C = 16). S is computed exactly instead, in one of two ways that ran at
  about the speed of float ``Conv`` here (``benchmarks/onnx_conv_speed.py``; ``QLinearConv`` ran several times
  faster): float ``Conv`` on the integer levels (fewer nodes), exact when 9 C Z^2 <= 2^24 (every product and
  partial sum is then an integer that float32 holds exactly, whatever the summation order: every 2- and 4-bit
  layer up to 8,285 input channels, 8-bit layers up to 28), else ``ConvInteger`` on uint8 x uint8 (int32, exact),
  used by 8-bit layers wider than that: activations q with zero point 2^(k-1) and weights r with zero point
  2^(k-1) give t = q - 2^(k-1), v = r - 2^(k-1), a = 2t + 1, w = 2v + 1, so S = 4 sum(t v) + 2 sum(t) +
  sum_valid(w): one extra output channel of ones gives sum(t), and sum_valid(w) (per output channel and position:
  the borders have fewer taps) is a constant of the graph. ONNX Runtime's ``ConvMulFusion`` would fold the scale
  into the weights and round every partial sum: the engine's sessions disable it (``onnx_engine.KEEP_EXACT``).
- Exit heads: BatchNorm, ``Relu``, ``AveragePool`` (kernel = stride = N for ``kN``) or ``GlobalAveragePool``,
  ``Flatten`` (channel-major, as ``torch.flatten``), then ``Gemm``, or with a hidden layer ``Gemm`` (no bias),
  the folded BatchNorm1d as ``Mul`` + ``Add``, ``Relu``, ``Gemm``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import need
from ..model.quant import RoundedOnceConv2d, weight_levels
from ..model.resnet import block_specs, edge_feature_shape
from . import check_backbone, check_options
from .folding import fold_bn

OPSET = 17
FLOAT_EXACT = 2**24  # float32 holds every integer of magnitude up to this exactly


def _onnx():
    return need("onnx", "ONNX export")


def float_conv_exact(cin: int, bits: int) -> bool:
    """Whether float ``Conv`` on a k-bit conv's integer levels is exact: every partial sum within 2^24."""
    return 9 * cin * (2**bits - 1) ** 2 <= FLOAT_EXACT


class GraphBuilder:
    """Names, initializers and nodes of one graph; each method adds a step and returns its output name."""

    def __init__(self):
        self.onnx = _onnx()
        self.nodes, self.inits, self._n = [], [], 0
        self.quantizer_inputs: list[str] = []  # every quantized conv's quantizer input, in order (for tracing)

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, value, dtype=np.float32, base="c") -> str:
        n = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(self, kind: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(kind.lower())
        self.nodes.append(self.onnx.helper.make_node(kind, inputs, [out], **attrs))
        return out

    def channel(self, t: torch.Tensor) -> str:
        return self.const(t.detach().float().reshape(1, -1, 1, 1).numpy())

    def bn(self, x: str, bn: nn.BatchNorm2d | nn.BatchNorm1d, fused: bool = False) -> str:
        """Eval BatchNorm with the folded terms: float32 ``Mul`` + ``Add``, or with ``fused`` the fused multiply-add
        that torch computes, in float64 (module docstring; the folded terms are float32 values either way)."""
        a, b = fold_bn(bn)
        shape = (1, -1) if isinstance(bn, nn.BatchNorm1d) else (1, -1, 1, 1)
        dtype = np.float64 if fused else np.float32
        a, b = (self.const(t.detach().float().reshape(shape).numpy(), dtype) for t in (a, b))
        if not fused:
            return self.op("Add", [self.op("Mul", [x, a]), b])
        tp = self.onnx.TensorProto
        y = self.op("Add", [self.op("Mul", [self.op("Cast", [x], to=tp.DOUBLE), a]), b])
        return self.op("Cast", [y], to=tp.FLOAT)

    def float_conv(self, x: str, conv: nn.Conv2d) -> str:
        s = conv.stride[0]
        return self.op("Conv", [x, self.const(conv.weight.detach().float().numpy())], pads=[1, 1, 1, 1], strides=[s, s])

    def rounded_once_conv(self, x: str, conv: nn.Conv2d) -> str:
        """A 3x3, stride-1 float conv summed in float64 and rounded once to float32 (``quant.RoundedOnceConv2d``;
        ONNX Runtime has no float64 ``Conv``): the 9 C shifted copies of the zero-padded input (``Pad``, ``Slice``,
        ``Concat``: exact), ``Cast`` to float64, one ``MatMul`` with the (9 C, O) weights, ``Cast`` back."""
        tp, (o, c) = self.onnx.TensorProto, conv.weight.shape[:2]
        padded = self.op("Pad", [x, self.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64)])
        taps = []
        for ky in range(3):
            for kx in range(3):  # rows ky .. ky + H, columns kx .. kx + W of the padded input (negative ends: -2 + k)
                ends = [-2 + ky if ky < 2 else 2**31 - 1, -2 + kx if kx < 2 else 2**31 - 1]
                taps.append(self.op("Slice", [padded, self.const([ky, kx], np.int64), self.const(ends, np.int64),
                                              self.const([2, 3], np.int64)]))
        cols = self.op("Transpose", [self.op("Cast", [self.op("Concat", taps, axis=1)], to=tp.DOUBLE)], perm=[0, 2, 3, 1])
        w = conv.weight.detach().double().permute(2, 3, 1, 0).reshape(9 * c, o)  # row (3 ky + kx) C + c
        y = self.op("Transpose", [self.op("MatMul", [cols, self.const(w.numpy(), np.float64)])], perm=[0, 3, 1, 2])
        return self.op("Cast", [y], to=tp.FLOAT)

    def binary_conv(self, z: str, conv: nn.Conv2d) -> str:
        """sign(z) (sign(0) = +1) -> QLinearConv with +-1 weights -> dequantized exact sum -> times alpha."""
        w = conv.weight.detach().float()
        fan_in = 9 * w.shape[1]
        ys = 1.0 if fan_in <= 127 else 2.0
        q = self.op("Where", [self.op("GreaterOrEqual", [z, self.const(0.0)]), self.const(2, np.uint8), self.const(0, np.uint8)])
        one, s = self.const(1.0), conv.stride[0]
        y = self.op("QLinearConv", [q, one, self.const(1, np.uint8), self.const(torch.where(w >= 0, 1, -1).numpy(), np.int8),
                                    one, self.const(0, np.int8), self.const(ys), self.const(128, np.uint8)],
                    pads=[1, 1, 1, 1], strides=[s, s])
        acc = self.op("DequantizeLinear", [y, self.const(ys), self.const(128, np.uint8)])
        return self.op("Mul", [acc, self.channel(w.abs().mean(dim=(1, 2, 3)))])

    def level_index(self, z: str, bits: int) -> str:
        """q = round((clip(z, -1, 1) + 1) * Z / 2), float in 0..Z: ``quant._UniformSTE`` step for step."""
        zz = 2**bits - 1
        c = self.op("Clip", [z, self.const(-1.0), self.const(1.0)])
        return self.op("Round", [self.op("Mul", [self.op("Add", [c, self.const(1.0)]), self.const(zz / 2.0)])])

    def kbit_sum_float(self, q: str, r: torch.Tensor, bits: int, stride: int) -> str:
        """The exact integer sum of a * w as float ``Conv`` on the levels (exact under ``float_conv_exact``)."""
        zz = float(2**bits - 1)
        a = self.op("Sub", [self.op("Mul", [q, self.const(2.0)]), self.const(zz)])
        w = self.op("Sub", [self.op("Mul", [self.op("Cast", [self.const(r.numpy(), np.uint8)], to=self.onnx.TensorProto.FLOAT),
                                            self.const(2.0)]), self.const(zz)])  # constant, folded at load
        return self.op("Conv", [a, w], pads=[1, 1, 1, 1], strides=[stride, stride])

    def kbit_sum_integer(self, q: str, r: torch.Tensor, bits: int, stride: int, size: int) -> str:
        """The exact integer sum of a * w as ``ConvInteger`` (uint8 x uint8), int32:
        S = 4 sum(t v) + 2 sum(t) + sum_valid(w) with t = q - 2^(k-1), v = r - 2^(k-1) (module docstring)."""
        tp, half = self.onnx.TensorProto, 2 ** (bits - 1)
        o, cin = r.shape[:2]
        w_all = torch.cat([r, torch.full((1, cin, 3, 3), half + 1.0)])  # channel o: sum(t v), channel O: sum(t)
        u = self.op("Cast", [q], to=tp.UINT8)
        zp = self.const(half, np.uint8)
        y = self.op("ConvInteger", [u, self.const(w_all.numpy(), np.uint8), zp, zp], pads=[1, 1, 1, 1], strides=[stride, stride])
        tv = self.op("Slice", [y, self.const([0], np.int64), self.const([o], np.int64), self.const([1], np.int64)])
        t = self.op("Slice", [y, self.const([o], np.int64), self.const([o + 1], np.int64), self.const([1], np.int64)])
        valid = F.conv2d(torch.ones(1, cin, size, size, dtype=torch.float64), 2 * r.double() - (2**bits - 1),
                         stride=stride, padding=1)  # sum_valid(w) per output channel and position
        s = self.op("Add", [self.op("Mul", [tv, self.const(4, np.int32)]), self.op("Mul", [t, self.const(2, np.int32)])])
        return self.op("Add", [s, self.const(valid.numpy(), np.int32)])

    def kbit_conv(self, z: str, conv: nn.Conv2d, bits: int, size: int, integer: bool | None = None) -> str:
        """k-bit activation quantizer -> the exact integer conv of the levels times s_c / Z^2 (module docstring);
        ``integer``: ConvInteger (True) or float Conv (False) for the exact sum instead of the choice by
        ``float_conv_exact``."""
        r, s = weight_levels(conv.weight, bits)
        q, stride = self.level_index(z, bits), conv.stride[0]
        if integer is None:
            integer = not float_conv_exact(r.shape[1], bits)
        if integer:
            acc = self.op("Cast", [self.kbit_sum_integer(q, r, bits, stride, size)], to=self.onnx.TensorProto.FLOAT)
        else:
            acc = self.kbit_sum_float(q, r, bits, stride)
        return self.op("Mul", [acc, self.channel(s.double() / (2**bits - 1) ** 2)])

    def rprelu(self, y: str, m) -> str:
        """RPReLU: PReLU_beta(y - gamma) + zeta, per channel."""
        slope = self.const(m.slope.detach().float().reshape(-1, 1, 1).numpy())
        p = self.op("PRelu", [self.op("Sub", [y, self.channel(m.shift_in)]), slope])
        return self.op("Add", [p, self.channel(m.shift_out)])

    def quan_conv(self, x: str, q, size: int) -> str:
        """``BNQuantConv`` (the paper's QuanConv): BatchNorm -> (RSign shift) -> activation quantizer -> conv
        (-> RPReLU); ``size``: the spatial size of its input."""
        z = self.bn(x, q.bn, fused=q.bits != 32)
        if q.shift is not None:
            z = self.op("Sub", [z, self.channel(q.shift.bias)])
        if q.bits != 32:
            self.quantizer_inputs.append(z)
        if q.bits == 32:
            y = self.float_conv(self.op("Relu", [z]), q.conv)
        elif q.bits == 1:
            y = self.binary_conv(z, q.conv)
        else:
            y = self.kbit_conv(z, q.conv, q.bits, size)
        return y if q.rprelu is None else self.rprelu(y, q.rprelu)

    def block(self, x: str, block, spec) -> str:
        y = self.quan_conv(self.quan_conv(x, block.c1, spec.in_size), block.c2, spec.out_size)
        sc = x
        if spec.stride != 1 or spec.in_ch != spec.out_ch:  # option A: subsample, zero channel padding
            sc = self.op("Slice", [x, self.const([0, 0], np.int64), self.const([2**31 - 1] * 2, np.int64),
                                   self.const([2, 3], np.int64), self.const([spec.stride] * 2, np.int64)])
            pad = spec.out_ch - spec.in_ch
            sc = self.op("Pad", [sc, self.const([0, pad // 2, 0, 0, 0, pad - pad // 2, 0, 0], np.int64)])
        return self.op("Add", [sc, y])

    def pool(self, x: str, pool: nn.Module) -> str:
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            return self.op("GlobalAveragePool", [x])
        k, s = (v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride))
        return self.op("AveragePool", [x], kernel_shape=[k, k], strides=[s, s])

    def linear(self, x: str, fc: nn.Linear) -> str:
        ins = [x, self.const(fc.weight.detach().float().numpy())]
        return self.op("Gemm", ins + ([self.const(fc.bias.detach().float().numpy())] if fc.bias is not None else []), transB=1)

    def head(self, x: str, head) -> str:
        """BatchNorm -> ReLU -> pool -> flatten -> [linear -> BatchNorm1d -> ReLU] -> linear (ExitHead and
        ClassifierHead)."""
        r = self.op("Relu", [self.bn(x, head.bn)])
        f = self.op("Flatten", [self.pool(r, head.pool)], axis=1)
        hidden = getattr(head, "hidden", None)
        if hidden is not None:
            lin, bn1d = hidden[0], hidden[1]
            f = self.op("Relu", [self.bn(self.linear(f, lin), bn1d)])
        return self.linear(f, head.fc)

    def entropy(self, logits: str, out: str) -> str:
        logp = self.op("LogSoftmax", [logits], axis=1)
        s = self.op("ReduceSum", [self.op("Mul", [self.op("Exp", [logp]), logp]), self.const([1], np.int64)], keepdims=0)
        return self.op("Neg", [s], out)

    def model(self, inputs, outputs, name: str):
        h = self.onnx.helper
        graph = h.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="hybridexit")
        self.onnx.checker.check_model(m)
        return m


def edge_model(edge, trace: bool = False):
    """The ONNX edge graph of an eval-mode ``EdgeNet`` (see the module docstring). ``trace``: also output every
    quantized conv's quantizer input (after BatchNorm and RSign) as ``quantizer_in_<k>``, k in network order."""
    cfg = edge.cfg
    check_backbone(cfg, "onnx")
    check_options(cfg, "onnx")
    g = GraphBuilder()
    tp, h = g.onnx.TensorProto, g.onnx.helper
    x = g.op("Div", [g.op("Cast", ["images"], to=tp.FLOAT), g.const(255.0)])
    x = g.op("Div", [g.op("Sub", [x, g.channel(edge.normalize.mean)]), g.channel(edge.normalize.std)])
    rounded_once = isinstance(edge.stem, RoundedOnceConv2d)
    x = g.rounded_once_conv(x, edge.stem) if rounded_once else g.float_conv(x, edge.stem)
    outputs = []
    specs = block_specs(cfg)
    for i, block in enumerate(edge.blocks):
        x = g.block(x, block, specs[i])
        j = cfg.exit_after_block(i)
        if j is not None:
            logits = g.op("Identity", [g.head(x, edge.exits[cfg.exit_key(j)])], f"logits_{j}")
            g.entropy(logits, f"entropy_{j}")
            outputs += [h.make_tensor_value_info(f"logits_{j}", tp.FLOAT, ["N", cfg.num_classes]),
                        h.make_tensor_value_info(f"entropy_{j}", tp.FLOAT, ["N"])]
    g.op("Identity", [x], "features")
    c, s, _ = edge.feature_shape
    outputs.append(h.make_tensor_value_info("features", tp.FLOAT, ["N", c, s, s]))
    for k, z in enumerate(g.quantizer_inputs if trace else []):
        g.op("Identity", [z], f"quantizer_in_{k}")
        outputs.append(h.make_tensor_value_info(f"quantizer_in_{k}", tp.FLOAT, ["N", "C", "H", "W"]))
    images = h.make_tensor_value_info("images", tp.UINT8, ["N", cfg.in_channels, cfg.image_size, cfg.image_size])
    return g.model([images], outputs, "hybridexit-edge")


def cloud_model(cloud):
    """The float ONNX graph of an eval-mode ``CloudNet``: features -> logits."""
    cfg = cloud.cfg
    g = GraphBuilder()
    tp, h = g.onnx.TensorProto, g.onnx.helper
    x = "features"
    specs = block_specs(cfg)[cfg.edge_blocks:]
    for block, spec in zip(cloud.blocks, specs):
        x = g.block(x, block, spec)
    g.op("Identity", [g.head(x, cloud.head)], "logits")
    c, s, _ = edge_feature_shape(cfg)
    return g.model([h.make_tensor_value_info("features", tp.FLOAT, ["N", c, s, s])],
                   [h.make_tensor_value_info("logits", tp.FLOAT, ["N", cfg.num_classes])], "hybridexit-cloud")
