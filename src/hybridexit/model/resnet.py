"""The config that makes a hybrid of a backbone (``HybridConfig``), and the CIFAR ResNet family's helpers.

The backbone is a field of the config (``backbone``; empty: the CIFAR ResNet of ``depth``, so every config written
before backbones existed reads unchanged); ``model.backbones`` holds the registry and the definitions. Counting
follows each backbone's notation (see docs/architecture.md and docs/backbones.md): for the CIFAR ResNets the
"layers" of "20E + 10C" are the 6n convs inside residual blocks, and block b (0-based) ends at layer 2(b+1), so a
split point or an exit position must be even; every other backbone counts blocks ("4E + 4C blocks"). The stem is
always at the edge in float; the head (everything after the last block) is always on the cloud.

CIFAR blocks are pre-activation (He et al., 2016, "Identity mappings"): each conv is a QuanConv
(BatchNorm -> activation -> conv), the paper's order for quantized layers, and float layers use the same order
with ReLU, so one state dict fits every precision. Shortcuts are the parameter-free "option A" of the original
CIFAR ResNet (subsample + zero channel padding) and are added in float.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .backbones import CIFAR_FAMILY, get_backbone, is_backbone
from .backbones.base import BlockSpec
from .backbones.cifar import BasicBlock, ClassifierHead
from .quant import check_bits, check_ste

__all__ = ["BasicBlock", "BlockSpec", "ClassifierHead", "HybridConfig", "Normalize", "block_specs",
           "edge_feature_shape", "init_weights", "make_blocks", "make_head", "make_stem"]

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
    # the network the hybrid is made of (model.backbones.BACKBONES); "" = the CIFAR ResNet of ``depth`` (then
    # ``edge_layers`` and ``exits`` count the paper's layers, two per block); other backbones count blocks
    backbone: str = ""

    def __post_init__(self):
        object.__setattr__(self, "exits", tuple(int(e) for e in self.exits))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        self._check_backbone()
        if self.is_cifar and ((self.depth - 2) % 6 != 0 or self.depth < 8):
            raise ConfigError(f"depth {self.depth} is not a CIFAR ResNet depth 6n+2 (e.g. {', '.join(map(str, DEPTHS))})")
        self._check_size()
        total, unit = self.conv_layers, self.backbone_def.per_block
        if not (0 <= self.edge_layers <= total) or self.edge_layers % unit:
            if self.is_cifar:
                raise ConfigError(
                    f"edge_layers={self.edge_layers} must be an even number of residual-block convs from 0 to {total} "
                    f"(a block boundary of ResNet-{self.depth}), e.g. 10, 16, 20, 24")
            raise ConfigError(f"{self.edge_layers} edge blocks: {self.backbone} has {total} blocks (0 to {total})")
        check_bits(self.edge_bits)
        if self.num_classes < 2:
            raise ConfigError(f"num_classes={self.num_classes} must be at least 2")
        if self.exit_pool not in EXIT_POOLS:
            raise ConfigError(f"exit_pool={self.exit_pool!r}: use one of {', '.join(EXIT_POOLS)}")
        if list(self.exits) != sorted(set(self.exits)):
            raise ConfigError(f"exits={list(self.exits)} must be distinct and increasing")
        for e in self.exits:
            if e % unit or not (unit <= e <= self.edge_layers):
                raise ConfigError(
                    f"exit at layer {e} is not allowed: exits sit at the edge on a block boundary, an even layer "
                    f"from 2 to edge_layers={self.edge_layers}" if self.is_cifar else
                    f"exit after block {e} is not allowed: exits sit at the edge, after block 1 to "
                    f"{self.edge_layers} (the edge blocks of {self.backbone})")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels or min(self.std) <= 0:
            raise ConfigError(f"mean {list(self.mean)} and std {list(self.std)} need one value per input channel "
                              f"({self.in_channels}), std > 0")
        self._check_options()

    def _check_backbone(self):
        name = str(self.backbone)
        if not is_backbone(name) and name != "":
            get_backbone(name)  # raises the registry's error (the names it knows)
        if name.startswith(CIFAR_FAMILY):  # canonical form: the CIFAR family is backbone "" at its depth
            if self.depth not in (32, int(name[len(CIFAR_FAMILY):])):
                raise ConfigError(f"depth={self.depth} and backbone={name!r} disagree: give one of them")
            object.__setattr__(self, "depth", int(name[len(CIFAR_FAMILY):]))
            object.__setattr__(self, "backbone", "")
        elif name and (self.depth != 32 or self.width != 16):
            raise ConfigError(f"depth and width describe the CIFAR ResNets; {name} has its own (leave them out)")

    def _check_size(self):
        bb = self.backbone_def
        if self.image_size < 1 or min(bb.stem_shape(self)[1], bb.block_specs(self)[-1].out_size) < 1:
            raise ConfigError(f"image_size={self.image_size} is too small for {bb.name}")

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
        if not self.is_cifar and (self.act_shift or self.rprelu):
            raise ConfigError(f"act_shift and rprelu are options of the CIFAR ResNets' QuanConv, not of {self.backbone}")
        if self.ste == "approx" and self.edge_bits != 1:
            raise ConfigError(f"ste='approx' (ApproxSign) is the gradient of a sign: it needs edge_bits=1, "
                              f"not {self.edge_bits}")

    @property
    def edge_options(self) -> dict:
        """The quantized edge convs' recipe options, as ``BNQuantConv`` keyword arguments."""
        return {k: getattr(self, k) for k in EDGE_OPTIONS}

    @property
    def is_cifar(self) -> bool:
        return self.backbone == ""

    @property
    def backbone_name(self) -> str:
        """The registry name of the backbone (``cifar_resnet32`` for the default)."""
        return self.backbone or f"{CIFAR_FAMILY}{self.depth}"

    @property
    def backbone_def(self):
        """The backbone's description (``model.backbones``): stem, blocks, head, notation."""
        return get_backbone(self.backbone_name)

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    @property
    def conv_layers(self) -> int:
        """The backbone's length in its notation's units: the convs inside residual blocks for the CIFAR ResNets
        (30 for ResNet-32, the paper's layer count), blocks for the others (8 for ResNet-18)."""
        return 6 * self.blocks_per_stage if self.is_cifar else len(self.backbone_def.block_specs(self))

    @property
    def edge_blocks(self) -> int:
        return self.edge_layers // (2 if self.is_cifar else 1)

    @property
    def notation(self) -> str:
        """Where the split is: "20E+10C" (the paper's layers) for the CIFAR ResNets, "4E+4C blocks" for the others."""
        rest = self.conv_layers - self.edge_layers
        return f"{self.edge_layers}E+{rest}C" + ("" if self.is_cifar else " blocks")

    @property
    def name(self) -> str:
        ex = "-".join(map(str, self.exits)) or "none"
        net = f"resnet{self.depth}" if self.is_cifar else f"{self.backbone}-s{self.image_size}"
        return f"{net}-c{self.num_classes}-e{self.edge_layers}-b{self.edge_bits}-x{ex}"

    def replace(self, **kw) -> "HybridConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exits"] = list(self.exits)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        for k, default in OPTION_DEFAULTS.items():  # recipe options only when set (see OPTION_DEFAULTS)
            if d[k] == default:
                del d[k]
        if self.is_cifar:  # configs of the CIFAR ResNets stay what they were before backbones (fingerprints too)
            del d["backbone"]
        else:
            del d["depth"], d["width"]
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

    # The one place where the notation's counts meet block indices and exit keys (CIFAR: block b ends at layer
    # 2(b+1); other backbones: block b ends at b + 1).
    def exit_block(self, j: int) -> int:
        """Index of the block after which exit ``j`` (0-based, in order) sits."""
        return self.exits[j] // (2 if self.is_cifar else 1) - 1

    def exit_key(self, j: int) -> str:
        """Name of exit ``j``'s head in the network (``exits.<layer>`` in state dicts)."""
        return str(self.exits[j])

    def exit_after_block(self, b: int) -> int | None:
        """The exit (0-based) that sits after block ``b``, or None."""
        layer = (2 if self.is_cifar else 1) * (b + 1)
        return self.exits.index(layer) if layer in self.exits else None


def block_specs(cfg: HybridConfig) -> list[BlockSpec]:
    """The backbone's blocks for this config (input size, width): shapes, strides and convolutions."""
    return cfg.backbone_def.block_specs(cfg)


def edge_feature_shape(cfg: HybridConfig) -> tuple[int, int, int]:
    """(C, H, W) of what the edge sends to the cloud: the residual stream after the last edge block."""
    return feature_shape_at(cfg, cfg.edge_blocks)


def feature_shape_at(cfg: HybridConfig, boundary: int) -> tuple[int, int, int]:
    """(C, H, W) of the residual stream at a block boundary: before block ``boundary`` (0: the stem's output;
    the number of blocks: the last block's output)."""
    specs = block_specs(cfg)
    if not 0 <= boundary <= len(specs):
        raise ConfigError(f"block boundary {boundary} outside 0..{len(specs)} (this network has {len(specs)} blocks)")
    if boundary == 0:
        return tuple(cfg.backbone_def.stem_shape(cfg))
    s = specs[boundary - 1]
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


def make_stem(cfg: HybridConfig) -> nn.Module:
    """The backbone's float stem."""
    return cfg.backbone_def.make_stem(cfg)


def make_blocks(cfg: HybridConfig) -> nn.ModuleList:
    """The backbone's blocks: the first ``edge_blocks`` quantized (with the config's edge options), the rest float."""
    bb = cfg.backbone_def
    return nn.ModuleList(
        bb.make_block(s, cfg.edge_bits, cfg.edge_options) if s.index < cfg.edge_blocks else bb.make_block(s, 32, {})
        for s in bb.block_specs(cfg))


def make_head(cfg: HybridConfig) -> nn.Module:
    """The backbone's head (everything after the last block), on the cloud."""
    return cfg.backbone_def.make_head(cfg)


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
