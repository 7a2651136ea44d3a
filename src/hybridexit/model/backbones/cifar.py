"""The CIFAR ResNet family (depth 6n+2, He et al. 2016): 3x3 float stem, three stages of pre-activation basic blocks
(16, 32, 64 channels x ``width / 16``), BatchNorm -> ReLU -> global pool -> linear head.

Blocks are pre-activation (He et al., 2016, "Identity mappings"): each conv is a BNQuantConv (the paper's QuanConv:
BatchNorm -> activation -> conv), the paper's order for quantized layers, and float layers use the same order with
ReLU, so one state dict fits every precision. Shortcuts are the parameter-free "option A" of the original CIFAR
ResNet (subsample + zero channel padding) and are added in float.
Notation: the paper's layers, the 6n convs inside the blocks ("20E+10C").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import BNQuantConv, RoundedOnceConv2d
from .base import BlockSpec, ConvSpec


class BasicBlock(nn.Module):
    """Pre-activation residual block: x + BNQuantConv(BNQuantConv(x)), float shortcut (option A when downsampling)."""

    residual_add = True  # the energy model counts one 32-bit add per output element

    def __init__(self, in_ch: int, out_ch: int, stride: int, bits: int, **options):
        super().__init__()
        self.bits = bits
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.c1 = BNQuantConv(in_ch, out_ch, stride, bits, **options)
        self.c2 = BNQuantConv(out_ch, out_ch, 1, bits, **options)

    def shortcut(self, x):
        if self.stride == 1 and self.in_ch == self.out_ch:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        pad = self.out_ch - self.in_ch
        return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))

    def forward(self, x):
        return self.shortcut(x) + self.c2(self.c1(x))


class ClassifierHead(nn.Module):
    """Final head on the cloud: BatchNorm -> ReLU -> global average pool -> linear."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(x))), 1))


class CifarResNet:
    """ResNet-``depth`` for small images (any size; 32x32 for CIFAR)."""

    family = "cifar_resnet"
    per_block, unit = 2, "layer"
    default_edge_bits = 32

    def __init__(self, depth: int):
        self.depth = depth
        self.name = f"cifar_resnet{depth}"

    def block_specs(self, cfg) -> list[BlockSpec]:
        specs, ch, size, i = [], cfg.width, cfg.image_size, 0
        for stage in range(3):
            out = cfg.width * 2**stage
            for b in range((cfg.depth - 2) // 6):
                stride = 2 if (stage > 0 and b == 0) else 1
                out_size = (size + stride - 1) // stride
                convs = (ConvSpec("c1.conv", ch, out, 3, stride), ConvSpec("c2.conv", out, out, 3, 1))
                specs.append(BlockSpec(i, ch, out, stride, size, out_size, "cifar_basic", convs))
                ch, size, i = out, out_size, i + 1
        return specs

    def stem_shape(self, cfg) -> tuple[int, int, int]:
        return (cfg.width, cfg.image_size, cfg.image_size)

    def make_stem(self, cfg) -> nn.Module:
        conv = nn.Conv2d if cfg.edge_bits == 32 else RoundedOnceConv2d  # quantized edges: rounded once, in eval
        return conv(cfg.in_channels, cfg.width, 3, 1, 1, bias=False)

    def make_block(self, spec: BlockSpec, bits: int, options: dict) -> nn.Module:
        return BasicBlock(spec.in_ch, spec.out_ch, spec.stride, bits, **(options if bits != 32 else {}))

    def make_head(self, cfg) -> nn.Module:
        return ClassifierHead(self.block_specs(cfg)[-1].out_ch, cfg.num_classes)

    from_torchvision = None  # no torchvision counterpart
