"""Export the two halves as ONNX graphs, built node by node (``onnx.helper``) so every node is the one we chose.

Edge (``edge.onnx``): input ``images`` uint8 (N, C, H, W), raw; the network's normalization (``x / 255``, then
``(x - mean) / std``), the float stem ``Conv``, the residual blocks, every exit head, and outputs ``logits_j`` and
``entropy_j`` (softmax entropy, natural log, temperature 1) per exit and ``features`` (the residual stream after
the last edge block, every sample: the graph takes no exits itself; the engine applies the exit rule).
Cloud (``cloud.onnx``): input ``features``, the float blocks and the final head, output ``logits``.

A binary conv is ``QLinearConv`` on uint8 activations with zero point 1 (sign(x) = -1 -> 0, +1 -> 2; the padding
value, the zero point, is exactly the 0 of training's zero padding) and int8 weights +-1, then the per-channel
scale alpha in float. Its int32 sum is requantized to uint8 with scale ``s`` and zero point 128: ``s = 1`` when the
fan-in 9 C is at most 127 (exact), else ``s = 2``: exact for even sums in [-256, 254] (a binary sum has the parity
of its fan-in 9 C, so even for even C), saturated beyond, within one step (rounded half to even) for odd sums.
k-bit edges are not exported yet (refused). The BatchNorm before each conv is ``Mul`` + ``Add`` with the folded
terms (PyTorch fuses them into one multiply-add: the results differ in the last bit at most).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import EngineError
from ..resnet import block_specs, edge_feature_shape
from . import check_options
from .packed import fold_bn

OPSET = 17


def _onnx():
    try:
        import onnx
    except ImportError:
        raise EngineError("ONNX export needs the onnx extra: pip install 'hybridexit[onnx]'") from None
    return onnx


class GraphBuilder:
    """Names, initializers and nodes of one graph; each method adds a step and returns its output name."""

    def __init__(self):
        self.onnx = _onnx()
        self.nodes, self.inits, self._n = [], [], 0

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

    def bn(self, x: str, bn: nn.BatchNorm2d) -> str:
        a, b = fold_bn(bn)
        return self.op("Add", [self.op("Mul", [x, self.channel(a)]), self.channel(b)])

    def float_conv(self, x: str, conv: nn.Conv2d) -> str:
        s = conv.stride[0]
        return self.op("Conv", [x, self.const(conv.weight.detach().float().numpy())], pads=[1, 1, 1, 1], strides=[s, s])

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

    def quan_conv(self, x: str, q) -> str:
        """The project's QuanConv: BatchNorm -> activation quantizer -> conv."""
        z = self.bn(x, q.bn)
        if q.bits == 32:
            return self.float_conv(self.op("Relu", [z]), q.conv)
        if q.bits == 1:
            return self.binary_conv(z, q.conv)
        raise EngineError(f"ONNX export of {q.bits}-bit layers is not implemented (binary and float layers are)")

    def block(self, x: str, block, spec) -> str:
        y = self.quan_conv(self.quan_conv(x, block.c1), block.c2)
        sc = x
        if spec.stride != 1 or spec.in_ch != spec.out_ch:  # option A: subsample, zero channel padding
            sc = self.op("Slice", [x, self.const([0, 0], np.int64), self.const([2**31 - 1] * 2, np.int64),
                                   self.const([2, 3], np.int64), self.const([spec.stride] * 2, np.int64)])
            pad = spec.out_ch - spec.in_ch
            sc = self.op("Pad", [sc, self.const([0, pad // 2, 0, 0, 0, pad - pad // 2, 0, 0], np.int64)])
        return self.op("Add", [sc, y])

    def head(self, x: str, head, global_pool: bool) -> str:
        """BatchNorm -> ReLU -> pool -> flatten -> linear (ExitHead and ClassifierHead)."""
        r = self.op("Relu", [self.bn(x, head.bn)])
        p = self.op("GlobalAveragePool", [r]) if global_pool else self.op("AveragePool", [r], kernel_shape=[3, 3], strides=[3, 3])
        return self.op("Gemm", [self.op("Flatten", [p], axis=1), self.const(head.fc.weight.detach().float().numpy()),
                                self.const(head.fc.bias.detach().float().numpy())], transB=1)

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


def edge_model(edge):
    """The ONNX edge graph of an eval-mode ``EdgeNet`` (see the module docstring)."""
    cfg = edge.cfg
    if cfg.edge_bits not in (1, 32):
        raise EngineError(f"ONNX export of a {cfg.edge_bits}-bit edge is not implemented: binary and float edges are")
    check_options(cfg, "onnx")
    g = GraphBuilder()
    tp, h = g.onnx.TensorProto, g.onnx.helper
    x = g.op("Div", [g.op("Cast", ["images"], to=tp.FLOAT), g.const(255.0)])
    x = g.op("Div", [g.op("Sub", [x, g.channel(edge.normalize.mean)]), g.channel(edge.normalize.std)])
    x = g.float_conv(x, edge.stem)
    outputs = []
    specs = block_specs(cfg)
    for i, block in enumerate(edge.blocks):
        x = g.block(x, block, specs[i])
        j = cfg.exit_after_block(i)
        if j is not None:
            logits = g.head(x, edge.exits[cfg.exit_key(j)], cfg.exit_pool == "global")
            logits = g.op("Identity", [logits], f"logits_{j}")
            g.entropy(logits, f"entropy_{j}")
            outputs += [h.make_tensor_value_info(f"logits_{j}", tp.FLOAT, ["N", cfg.num_classes]),
                        h.make_tensor_value_info(f"entropy_{j}", tp.FLOAT, ["N"])]
    g.op("Identity", [x], "features")
    c, s, _ = edge.feature_shape
    outputs.append(h.make_tensor_value_info("features", tp.FLOAT, ["N", c, s, s]))
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
    g.op("Identity", [g.head(x, cloud.head, True)], "logits")
    c, s, _ = edge_feature_shape(cfg)
    return g.model([h.make_tensor_value_info("features", tp.FLOAT, ["N", c, s, s])],
                   [h.make_tensor_value_info("logits", tp.FLOAT, ["N", cfg.num_classes])], "hybridexit-cloud")
