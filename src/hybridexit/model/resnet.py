"""The CIFAR ResNet family (depth 6n+2) as a flat sequence of blocks, and the config that makes a hybrid of it.

Layer counting follows the paper (see docs/architecture.md): the "layers" of "20E + 10C" are the 6n convs inside
residual blocks. Block b (0-based) ends at layer 2(b+1), so a split point or an exit position must be even.
The stem conv is always at the edge in float; the final BatchNorm/ReLU/pool/linear head is always on the cloud.

Blocks are pre-activation (He et al., 2016, "Identity mappings"): each conv is a QuanConv
(BatchNorm -> activation -> conv), the paper's order for quantized layers, and float layers use the same order
with ReLU, so one state dict fits every precision. Shortcuts are the parameter-free "option A" of the original
CIFAR ResNet (subsample + zero channel padding) and are added in float.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .quant import QuanConv, check_bits, check_ste

DEPTHS = (20, 32, 44, 56, 110)
EXIT_POOLS = ("k3", "global", "k2", "k4")  # kN: average pool, kernel N / stride N (k3: the authors' code)
# Binary-edge recipe options (issue 21, docs/recipes.md): written to a config only when set, so the configs (and
# checkpoint fingerprints) of networks without them are exactly what they were before the options existed.
EDGE_OPTIONS = ("act_shift", "rprelu", "ste")
OPTION_DEFAULTS = {"act_shift": False, "rprelu": False, "ste": "clip", "exit_hidden": 0}


@dataclass(frozen=True)
class HybridConfig:
    """Everything needed to rebuild a (hybrid) network; saved as JSON beside every checkpoint."""

    depth: int = 32
    num_classes: int = 10
    edge_layers: int = 0
    edge_bits: int = 32
    exits: tuple[int, ...] = ()
    exit_pool: str = "k3"
    width: int = 16
    in_channels: int = 3
    image_size: int = 32
    # preprocessing travels with the model: images in [0, 1] are standardized per channel by the network itself
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    # recipe options (quant.py, exits.py); the defaults are the paper's plain XNOR edge and one-linear exits
    act_shift: bool = False  # ReActNet RSign: learnable per-channel threshold before each edge activation quantizer
    rprelu: bool = False  # ReActNet RPReLU: learnable per-channel shifts and slope after each edge quantized conv
    ste: str = "clip"  # gradient of binary activations: clip (|x| <= 1) or approx (Bi-Real ApproxSign)
    exit_hidden: int = 0  # exit heads: 0 = one linear; H > 0 = linear -> BatchNorm -> ReLU -> linear, H wide

    def __post_init__(self):
        object.__setattr__(self, "exits", tuple(int(e) for e in self.exits))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.depth not in DEPTHS and (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ConfigError(f"depth {self.depth} is not a CIFAR ResNet depth 6n+2 (e.g. {', '.join(map(str, DEPTHS))})")
        total = self.conv_layers
        if not (0 <= self.edge_layers <= total) or self.edge_layers % 2:
            raise ConfigError(
                f"edge_layers={self.edge_layers} must be an even number of residual-block convs from 0 to {total} "
                f"(a block boundary of ResNet-{self.depth}), e.g. 10, 16, 20, 24")
        check_bits(self.edge_bits)
        if self.num_classes < 2:
            raise ConfigError(f"num_classes={self.num_classes} must be at least 2")
        if self.exit_pool not in EXIT_POOLS:
            raise ConfigError(f"exit_pool={self.exit_pool!r}: use one of {', '.join(EXIT_POOLS)}")
        if list(self.exits) != sorted(set(self.exits)):
            raise ConfigError(f"exits={list(self.exits)} must be distinct and increasing")
        for e in self.exits:
            if e % 2 or not (2 <= e <= self.edge_layers):
                raise ConfigError(
                    f"exit at layer {e} is not allowed: exits sit at the edge on a block boundary, an even layer "
                    f"from 2 to edge_layers={self.edge_layers}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels or min(self.std) <= 0:
            raise ConfigError(f"mean {list(self.mean)} and std {list(self.std)} need one value per input channel "
                              f"({self.in_channels}), std > 0")
        self._check_options()

    def _check_options(self):
        if not (isinstance(self.act_shift, bool) and isinstance(self.rprelu, bool)):
            raise ConfigError(f"act_shift={self.act_shift!r} and rprelu={self.rprelu!r} must be true or false")
        check_ste(self.ste)
        if isinstance(self.exit_hidden, bool) or not isinstance(self.exit_hidden, int) or self.exit_hidden < 0:
            raise ConfigError(f"exit_hidden={self.exit_hidden!r} must be a width >= 0 (0: one linear layer)")
        set_opts = [k for k in EDGE_OPTIONS if getattr(self, k) != OPTION_DEFAULTS[k]]
        if set_opts and (self.edge_bits == 32 or self.edge_layers == 0):
            raise ConfigError(f"{', '.join(set_opts)}: options of the quantized edge convs; this network has none "
                              f"(edge_layers={self.edge_layers}, edge_bits={self.edge_bits})")
        if self.ste == "approx" and self.edge_bits != 1:
            raise ConfigError(f"ste='approx' (ApproxSign) is the gradient of a sign: it needs edge_bits=1, "
                              f"not {self.edge_bits}")

    @property
    def edge_options(self) -> dict:
        """The quantized edge convs' recipe options, as ``QuanConv`` keyword arguments."""
        return {k: getattr(self, k) for k in EDGE_OPTIONS}

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    @property
    def conv_layers(self) -> int:
        """Number of convs inside residual blocks (30 for ResNet-32): the paper's layer count."""
        return 6 * self.blocks_per_stage

    @property
    def edge_blocks(self) -> int:
        return self.edge_layers // 2

    @property
    def name(self) -> str:
        ex = "-".join(map(str, self.exits)) or "none"
        return f"resnet{self.depth}-c{self.num_classes}-e{self.edge_layers}-b{self.edge_bits}-x{ex}"

    def replace(self, **kw) -> "HybridConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exits"] = list(self.exits)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        for k, default in OPTION_DEFAULTS.items():  # recipe options only when set (see OPTION_DEFAULTS)
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict, data: dict | None = None) -> "HybridConfig":
        """Rebuild from ``to_dict()``. Configs written before the exit policy and preprocessing moved: their
        ``thresholds`` are dropped here (``policy.read_policy`` reads them), and their mean/std come from ``data``
        (the checkpoint's dataset record)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a network config is a JSON object, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k != "thresholds"}
        if "mean" not in d and data and "mean" in data:
            d["mean"], d["std"] = data["mean"], data["std"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown network config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    # The one place where paper layer counts meet block indices and exit keys (block b ends at layer 2(b+1)).
    def exit_block(self, j: int) -> int:
        """Index of the block after which exit ``j`` (0-based, in order) sits."""
        return self.exits[j] // 2 - 1

    def exit_key(self, j: int) -> str:
        """Name of exit ``j``'s head in the network (``exits.<layer>`` in state dicts)."""
        return str(self.exits[j])

    def exit_after_block(self, b: int) -> int | None:
        """The exit (0-based) that sits after block ``b``, or None."""
        layer = 2 * (b + 1)
        return self.exits.index(layer) if layer in self.exits else None


class BasicBlock(nn.Module):
    """Pre-activation residual block: x + QuanConv(QuanConv(x)), float shortcut (option A when downsampling)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, bits: int, **options):
        super().__init__()
        self.bits = bits
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.c1 = QuanConv(in_ch, out_ch, stride, bits, **options)
        self.c2 = QuanConv(out_ch, out_ch, 1, bits, **options)

    def shortcut(self, x):
        if self.stride == 1 and self.in_ch == self.out_ch:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        pad = self.out_ch - self.in_ch
        return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))

    def forward(self, x):
        return self.shortcut(x) + self.c2(self.c1(x))


@dataclass(frozen=True)
class BlockSpec:
    index: int
    in_ch: int
    out_ch: int
    stride: int
    in_size: int  # spatial size of the block's input
    out_size: int

    @property
    def end_layer(self) -> int:
        """The paper's layer count at the end of this block (block b ends at layer 2(b+1))."""
        return 2 * (self.index + 1)


def block_specs(cfg: HybridConfig) -> list[BlockSpec]:
    specs, ch, size, i = [], cfg.width, cfg.image_size, 0
    for stage in range(3):
        out = cfg.width * 2**stage
        for b in range(cfg.blocks_per_stage):
            stride = 2 if (stage > 0 and b == 0) else 1
            out_size = (size + stride - 1) // stride
            specs.append(BlockSpec(i, ch, out, stride, size, out_size))
            ch, size, i = out, out_size, i + 1
    return specs


def edge_feature_shape(cfg: HybridConfig) -> tuple[int, int, int]:
    """(C, H, W) of what the edge sends to the cloud: the residual stream after the last edge block."""
    if cfg.edge_blocks == 0:
        return (cfg.width, cfg.image_size, cfg.image_size)
    s = block_specs(cfg)[cfg.edge_blocks - 1]
    return (s.out_ch, s.out_size, s.out_size)


class Normalize(nn.Module):
    """The network's first module: uint8 images (0-255) or float images in [0, 1] -> standardized float.

    Exactly the arithmetic training always used (``(x / 255 - mean) / std``), output channels-last, so raw images
    are the interface of every entry point (training, evaluation, the edge runtime)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def make_stem(cfg: HybridConfig) -> nn.Conv2d:
    return nn.Conv2d(cfg.in_channels, cfg.width, 3, 1, 1, bias=False)


def make_blocks(cfg: HybridConfig) -> nn.ModuleList:
    """The residual blocks: the first ``edge_blocks`` quantized (with the config's edge options), the rest float."""
    return nn.ModuleList(
        BasicBlock(s.in_ch, s.out_ch, s.stride, cfg.edge_bits, **cfg.edge_options) if s.index < cfg.edge_blocks
        else BasicBlock(s.in_ch, s.out_ch, s.stride, 32)
        for s in block_specs(cfg))


class ClassifierHead(nn.Module):
    """Final head on the cloud: BatchNorm -> ReLU -> global average pool -> linear."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(x))), 1))


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:  # an exit's hidden linear has none (a BatchNorm follows it)
                nn.init.zeros_(m.bias)
