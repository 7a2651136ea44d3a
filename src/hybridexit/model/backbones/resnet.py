"""ImageNet-style ResNets (He et al., 2016; torchvision's definition, v1.5: the stride in the bottleneck's 3x3):
7x7 stride-2 stem + 3x3 max pool, four stages of basic (ResNet-18/34) or bottleneck (ResNet-50) blocks, global
average pool + linear head; any input size. Module names inside the stem, each block and the head are
torchvision's, so a torchvision state dict loads after renaming the prefixes (``from_torchvision``):
``conv1.``/``bn1.`` -> ``stem.conv1.``/``stem.bn1.``, ``layer<s>.<j>.`` -> ``blocks.<i>.``, ``fc.`` -> ``head.fc.``.

A quantized block keeps the float block's modules and order (conv -> BatchNorm -> ReLU, residual add, ReLU); each
of its convs reads its input through the paper's QuanConv front (BatchNorm -> sign or k-bit quantizer,
``base.InputQuant``, keys ``q1``, ``q2``, ``q3``) and quantizes its weights. The shortcut's 1x1 conv (``downsample``)
stays float, as the paper keeps shortcuts float. Notation: blocks (ResNet-18 has 8, ResNet-50 16).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...errors import ConfigError
from .base import BlockSpec, ConvSpec, conv_out, make_conv, maybe_quant, plain_options

STAGE_WIDTHS = (64, 128, 256, 512)


class ResNetStem(nn.Module):
    """conv1 (7x7, stride 2, float) -> bn1 -> ReLU -> 3x3 max pool, stride 2; ``small``: conv1 3x3, stride 1, no
    max pool (the usual ResNet-18 for 32x32 images, which keeps the resolution for the blocks)."""

    def __init__(self, in_channels: int, small: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False) if small else nn.Conv2d(in_channels, 64, 7, 2, 3,
                                                                                              bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class _Residual(nn.Module):
    residual_add = True  # the energy model counts one 32-bit add per output element

    def _q(self, i: int, x):
        q = getattr(self, f"q{i}")
        return x if q is None else q(x)

    def _shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)


class ResNetBasicBlock(_Residual):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), convs quantized at ``bits``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, bits: int, ste: str = "clip"):
        super().__init__()
        self.bits = bits
        self.q1, self.conv1, self.bn1 = maybe_quant(in_ch, bits, ste), make_conv(in_ch, out_ch, 3, stride, bits), \
            nn.BatchNorm2d(out_ch)
        self.q2, self.conv2, self.bn2 = maybe_quant(out_ch, bits, ste), make_conv(out_ch, out_ch, 3, 1, bits), \
            nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(self._q(1, x))))
        h = self.bn2(self.conv2(self._q(2, h)))
        return self.relu(h + self._shortcut(x))


class ResNetBottleneck(_Residual):
    """torchvision's Bottleneck (v1.5): 1x1 reduce -> 3x3 (stride here) -> 1x1 expand (x4), each conv -> BN."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, bits: int, ste: str = "clip"):
        super().__init__()
        self.bits = bits
        mid = out_ch // 4
        self.q1, self.conv1, self.bn1 = maybe_quant(in_ch, bits, ste), make_conv(in_ch, mid, 1, 1, bits), \
            nn.BatchNorm2d(mid)
        self.q2, self.conv2, self.bn2 = maybe_quant(mid, bits, ste), make_conv(mid, mid, 3, stride, bits), \
            nn.BatchNorm2d(mid)
        self.q3, self.conv3, self.bn3 = maybe_quant(mid, bits, ste), make_conv(mid, out_ch, 1, 1, bits), \
            nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(self._q(1, x))))
        h = self.relu(self.bn2(self.conv2(self._q(2, h))))
        h = self.bn3(self.conv3(self._q(3, h)))
        return self.relu(h + self._shortcut(x))


class ResNetHead(nn.Module):
    """Global average pool -> fc (torchvision's ``avgpool`` and ``fc``)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ImageNetResNet:
    """ResNet-18/34 (basic blocks) or ResNet-50 (bottleneck blocks), torchvision's layout; ``small_stem``: the
    variant for 32x32 images (3x3 stride-1 stem, no max pool; its conv1 has another shape than torchvision's)."""

    family = "resnet"
    per_block, unit = 1, "block"
    default_edge_bits = 32

    def __init__(self, name: str, bottleneck: bool, layers: tuple[int, ...], small_stem: bool = False):
        self.name, self.bottleneck, self.layers, self.small_stem = name, bottleneck, tuple(layers), small_stem
        self.expansion = 4 if bottleneck else 1

    def stem_shape(self, cfg) -> tuple[int, int, int]:
        s = cfg.image_size if self.small_stem else conv_out(conv_out(cfg.image_size, 7, 2, 3), 3, 2, 1)
        return (64, s, s)

    def _stage_of(self) -> list[tuple[int, int]]:
        """(stage, index in stage) of every block, in order."""
        return [(s, j) for s, n in enumerate(self.layers) for j in range(n)]

    def block_specs(self, cfg) -> list[BlockSpec]:
        ch, size, _ = self.stem_shape(cfg)
        specs = []
        for i, (s, j) in enumerate(self._stage_of()):
            out = STAGE_WIDTHS[s] * self.expansion
            stride = 2 if (s > 0 and j == 0) else 1
            out_size = conv_out(size, 3, stride, 1)
            if self.bottleneck:
                mid = STAGE_WIDTHS[s]
                convs = [ConvSpec("conv1", ch, mid, 1, 1), ConvSpec("conv2", mid, mid, 3, stride),
                         ConvSpec("conv3", mid, out, 1, 1)]
            else:
                convs = [ConvSpec("conv1", ch, out, 3, stride), ConvSpec("conv2", out, out, 3, 1)]
            if stride != 1 or ch != out:
                convs.append(ConvSpec("downsample.0", ch, out, 1, stride))
            specs.append(BlockSpec(i, ch, out, stride, size, out_size,
                                   "bottleneck" if self.bottleneck else "basic", tuple(convs)))
            ch, size = out, out_size
        return specs

    def make_stem(self, cfg) -> nn.Module:
        return ResNetStem(cfg.in_channels, self.small_stem)

    def make_block(self, spec: BlockSpec, bits: int, options: dict) -> nn.Module:
        cls = ResNetBottleneck if self.bottleneck else ResNetBasicBlock
        return cls(spec.in_ch, spec.out_ch, spec.stride, bits, plain_options(self.name, options))

    def make_head(self, cfg) -> nn.Module:
        return ResNetHead(STAGE_WIDTHS[-1] * self.expansion, cfg.num_classes)

    def from_torchvision(self, state_dict: dict) -> dict:
        index = {(s, j): i for i, (s, j) in enumerate(self._stage_of())}
        out = {}
        for k, v in state_dict.items():
            m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", k)
            if m and (int(m[1]) - 1, int(m[2])) in index:
                out[f"blocks.{index[(int(m[1]) - 1, int(m[2]))]}.{m[3]}"] = v
            elif k.startswith(("conv1.", "bn1.")):
                out["stem." + k] = v
            elif k.startswith("fc."):
                out["head." + k] = v
            else:
                raise ConfigError(f"{k!r} is not a key of torchvision's {self.name}: is this state dict from another "
                                  f"network?")
        return out
