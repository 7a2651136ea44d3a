"""MobileNetV2 (Sandler et al., 2018; torchvision's definition, width 1.0): a 3x3 stride-2 float stem, 17 inverted
residual blocks (1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual add when the shape allows), a head
of 1x1 conv to 1280 channels, global average pool and linear (on the cloud); any input size. Module names are
torchvision's, so its state dict loads after renaming the prefixes (``from_torchvision``): ``features.0.`` ->
``stem.``, ``features.<1..17>.`` -> ``blocks.<0..16>.``, ``features.18.`` -> ``head.conv.``, ``classifier.`` ->
``head.classifier.``.

Quantized blocks: each conv reads its input through BatchNorm -> quantizer (``base.InputQuant``, keys ``q.<n>``) and
quantizes its weights. Binary depthwise convolutions are known to fail (9 weights per output: too little to
binarize), so depthwise convs run at ``DEPTHWISE_MIN_BITS`` or more: at ``edge_bits = 1`` the pointwise convs are
binary and the depthwise ones 4-bit; the edge's default is 4-bit. The energy model reads each conv's own bits and
counts grouped convolutions exactly. Notation: blocks (17).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...errors import ConfigError
from .base import BlockSpec, ConvSpec, conv_out, make_conv, maybe_quant, plain_options

# (expansion t, output channels c, repeats n, first stride s): the paper's Table 2
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CH, LAST_CH = 32, 1280
DEPTHWISE_MIN_BITS = 4


def depthwise_bits(bits: int) -> int:
    return bits if bits == 32 else max(bits, DEPTHWISE_MIN_BITS)


class ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: conv (no bias) -> BatchNorm -> ReLU6 (keys ``0.``, ``1.``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bits: int = 32):
        super().__init__(make_conv(in_ch, out_ch, kernel, stride, bits, groups), nn.BatchNorm2d(out_ch), nn.ReLU6())


class InvertedResidual(nn.Module):
    """torchvision's InvertedResidual (``conv`` = [expand ConvBNAct,] depthwise ConvBNAct, project conv, BN)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, bits: int, ste: str = "clip"):
        super().__init__()
        self.bits = bits
        hidden = in_ch * expand
        self.residual_add = stride == 1 and in_ch == out_ch  # the energy model counts its adds
        layers: list[nn.Module] = []
        quants: list[nn.Module | None] = []
        if expand != 1:
            layers.append(ConvBNAct(in_ch, hidden, 1, bits=bits))
            quants.append(maybe_quant(in_ch, bits, ste))
        dw = depthwise_bits(bits)
        layers.append(ConvBNAct(hidden, hidden, 3, stride, groups=hidden, bits=dw))
        quants.append(maybe_quant(hidden, dw, ste))
        layers += [make_conv(hidden, out_ch, 1, 1, bits), nn.BatchNorm2d(out_ch)]
        quants.append(maybe_quant(hidden, bits, ste))
        self.conv = nn.Sequential(*layers)
        self.q = None if bits == 32 else nn.ModuleList(quants)

    def forward(self, x):
        h, qi = x, 0
        for m in self.conv:
            if isinstance(m, (ConvBNAct, nn.Conv2d)):
                if self.q is not None:
                    h = self.q[qi](h)
                qi += 1
            h = m(h)
        return x + h if self.residual_add else h


class MobileNetHead(nn.Module):
    """features.18 (1x1 conv to 1280, BN, ReLU6) -> global average pool -> classifier (dropout 0.2, linear)."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.conv = ConvBNAct(in_ch, LAST_CH, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(LAST_CH, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.conv(x)), 1))


class MobileNetV2:
    name = family = "mobilenetv2"
    per_block, unit = 1, "block"
    default_edge_bits = 4

    def _blocks(self) -> list[tuple[int, int, int, int]]:
        """(in, out, stride, expansion) of every block."""
        out, ch = [], STEM_CH
        for t, c, n, s in SETTING:
            for j in range(n):
                out.append((ch, c, s if j == 0 else 1, t))
                ch = c
        return out

    def stem_shape(self, cfg) -> tuple[int, int, int]:
        s = conv_out(cfg.image_size, 3, 2, 1)
        return (STEM_CH, s, s)

    def block_specs(self, cfg) -> list[BlockSpec]:
        size = self.stem_shape(cfg)[1]
        specs = []
        for i, (cin, cout, stride, t) in enumerate(self._blocks()):
            hidden = cin * t
            out_size = conv_out(size, 3, stride, 1)
            convs = ([ConvSpec("conv.0.0", cin, hidden, 1, 1)] if t != 1 else [])
            k = len(convs)
            convs += [ConvSpec(f"conv.{k}.0", hidden, hidden, 3, stride, hidden), ConvSpec(f"conv.{k + 1}", hidden, cout, 1, 1)]
            specs.append(BlockSpec(i, cin, cout, stride, size, out_size, "inverted_residual", tuple(convs)))
            size = out_size
        return specs

    def make_stem(self, cfg) -> nn.Module:
        return ConvBNAct(cfg.in_channels, STEM_CH, 3, 2)

    def make_block(self, spec: BlockSpec, bits: int, options: dict) -> nn.Module:
        t = self._blocks()[spec.index][3]
        return InvertedResidual(spec.in_ch, spec.out_ch, spec.stride, t, bits, plain_options(self.name, options))

    def make_head(self, cfg) -> nn.Module:
        return MobileNetHead(SETTING[-1][1], cfg.num_classes)

    def from_torchvision(self, state_dict: dict) -> dict:
        n = len(self._blocks())
        out = {}
        for k, v in state_dict.items():
            m = re.fullmatch(r"features\.(\d+)\.(.+)", k)
            if m and int(m[1]) == 0:
                out[f"stem.{m[2]}"] = v
            elif m and 1 <= int(m[1]) <= n:
                out[f"blocks.{int(m[1]) - 1}.{m[2]}"] = v
            elif m and int(m[1]) == n + 1:
                out[f"head.conv.{m[2]}"] = v
            elif k.startswith("classifier."):
                out["head." + k] = v
            else:
                raise ConfigError(f"{k!r} is not a key of torchvision's mobilenet_v2: is this state dict from another "
                                  f"network?")
        return out
