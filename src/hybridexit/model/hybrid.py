"""HybridNet (the training view), its split into EdgeNet and CloudNet, and conditional inference (Algorithm 1).

The network is any registered backbone (``model.backbones``: a float stem, blocks, a head; the CIFAR ResNets by
default), built from ``HybridConfig`` with its first blocks quantized; the walk does not depend on which.
One definition of the network and one walk over it: ``_Walk.walk`` runs normalize -> stem -> blocks, calling back
after every block that carries an exit; ``HybridNet.forward`` (training: every exit's logits and the final logits),
``HybridNet.forward_intermediates`` (a frozen prefix), ``EdgeNet.forward`` / ``EdgeNet.decide`` (Algorithm 1: the
samples that exit leave the batch, the others go on) and ``CloudNet.forward`` are all that walk with different
callbacks. ``split()`` turns a HybridNet into two real modules with their own state dicts; the cloud half runs
only on the samples that did not exit (``conditional_inference``).

Inputs are raw images: uint8 (N, C, H, W), or float in [0, 1]; the network standardizes them itself
(``resnet.Normalize``, mean/std from the config).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, InputShapeError
from .exits import ExitHead, exits_here
from .resnet import (
    HybridConfig,
    Normalize,
    block_specs,
    feature_shape_at,
    init_weights,
    make_blocks,
    make_head,
    make_stem,
)

CLOUD = -1  # decided_at value (in batch tensors) for samples answered by the cloud half
FALLBACK = -2  # decided_at value when the cloud failed and the last exit's answer was used (runtime only)

EDGE, CLOUD_PLACE = "edge", "cloud"


def _check_images(x: torch.Tensor, cfg: HybridConfig) -> None:
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputShapeError(
            f"expected images of shape (N, {want[0]}, {want[1]}, {want[2]}) (uint8, or float in [0, 1]), got {got}")


def _make_exits(cfg: HybridConfig) -> nn.ModuleDict:
    specs = block_specs(cfg)
    heads = {}
    for j in range(len(cfg.exits)):
        s = specs[cfg.exit_block(j)]
        heads[cfg.exit_key(j)] = ExitHead(s.out_ch, s.out_size, cfg.num_classes, cfg.exit_pool, cfg.exit_hidden)
        heads[cfg.exit_key(j)].placement = f"exit:{j}"
    return nn.ModuleDict(heads)


def _place(cfg: HybridConfig, stem, blocks, head) -> None:
    """Placement attributes the energy model reads (edge, cloud, exit:k), set from the structure, not names."""
    stem.placement = EDGE
    for i, block in enumerate(blocks):
        block.placement = EDGE if i < cfg.edge_blocks else CLOUD_PLACE
    if head is not None:
        head.placement = CLOUD_PLACE


class _Walk(nn.Module):
    """What the three views share: the walk over (normalize, stem,) blocks, with a callback at each exit.

    ``first_block`` is the index in the whole network of ``self.blocks[0]`` (0, or the split point for the cloud).
    """

    cfg: HybridConfig
    first_block: int = 0

    def walk(self, x: torch.Tensor, on_exit=None, stop_block: int | None = None) -> torch.Tensor:
        """Run the network from its input (or, for the cloud half, from edge features) up to ``stop_block``.

        After each block that carries an exit j (and only if ``on_exit`` is given), ``on_exit(j, head, h)`` is
        called; it may return a boolean mask of the samples that go on (the others leave the batch)."""
        if getattr(self, "stem", None) is not None:
            _check_images(x, self.cfg)
            x = self.stem(self.normalize(x))
        for i, block in enumerate(self.blocks, start=self.first_block):
            if stop_block is not None and i >= stop_block:
                break
            x = block(x)
            j = self.cfg.exit_after_block(i)
            if j is not None and on_exit is not None and self.cfg.exit_key(j) in self.exits:
                keep = on_exit(j, self.exits[self.cfg.exit_key(j)], x)
                if keep is not None:
                    x = x[keep]
                    if x.shape[0] == 0:
                        break
        return x


class HybridNet(_Walk):
    """The whole network, for training: ``forward(x)`` returns ``[exit_0, ..., exit_{K-1}, final]`` logits."""

    def __init__(self, cfg: HybridConfig, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.stem = make_stem(cfg)
        self.blocks = make_blocks(cfg)
        self.exits = _make_exits(cfg)
        self.head = make_head(cfg)
        _place(cfg, self.stem, self.blocks, self.head)
        if init:  # off: PyTorch's default initialization only (shapes-only uses, e.g. counting operations)
            init_weights(self)

    def forward_intermediates(self, x: torch.Tensor, stop_block: int | None = None, exit_logits: bool = True):
        """(features after block ``stop_block - 1`` (or the last block), [per exit: logits, or the features the
        exit head reads when ``exit_logits`` is False], for the exits within the walked blocks)."""
        outs: list[torch.Tensor] = []
        h = self.walk(x, lambda j, head, f: outs.append(head(f) if exit_logits else f), stop_block)
        return h, outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, outs = self.forward_intermediates(x)
        return [*outs, self.head(h)]

    def backbone_parameters(self):
        """Parameters of the stem, blocks and final head (everything but the exits)."""
        for name, p in self.named_parameters():
            if not name.startswith("exits."):
                yield p

    def cloud_modules(self) -> nn.Sequential:
        """The cloud half as this network's own modules (shared, not copied): the blocks after the edge, then the
        final head. Training it trains this network; ``split()`` gives independent copies instead."""
        return nn.Sequential(*self.blocks[self.cfg.edge_blocks:], self.head)

    def split(self, at: int | None = None) -> tuple["EdgeNet", "CloudNet"]:
        """Two independent modules (deep copies) whose composition reproduces the whole network, handing off
        before block ``at`` (default: the checkpoint's boundary, ``cfg.edge_blocks``; 0: after the stem; the
        number of blocks: the edge runs every block, the cloud only the final head). Exits keep their positions:
        the edge holds those after blocks before ``at``."""
        m = self.cfg.edge_blocks if at is None else int(at)
        feature_shape_at(self.cfg, m)  # a boundary outside the network is refused here
        keys = [self.cfg.exit_key(j) for j in range(len(self.cfg.exits)) if self.cfg.exit_block(j) < m]
        exits = nn.ModuleDict({k: copy.deepcopy(self.exits[k]) for k in keys})
        edge = EdgeNet(self.cfg, copy.deepcopy(self.normalize), copy.deepcopy(self.stem),
                       copy.deepcopy(self.blocks[:m]), exits, boundary=m)
        cloud = CloudNet(self.cfg, copy.deepcopy(self.blocks[m:]), copy.deepcopy(self.head), first_block=m)
        return edge.train(self.training), cloud.train(self.training)


def resolve_thresholds(cfg: HybridConfig, thresholds, what: str = "thresholds") -> tuple[float, ...]:
    """One value per exit, as floats; a clear error when the count is wrong or none were given (a network without
    exits needs none)."""
    if thresholds is None and not cfg.exits:
        return ()
    if thresholds is None:
        raise ConfigError(f"no exit {what} given for {len(cfg.exits)} exits: calibrate the checkpoint "
                          f"(`hybridexit calibrate CKPT ... --write`) or pass --thresholds")
    t = tuple(float(v) for v in thresholds)
    if len(t) != len(cfg.exits):
        raise ConfigError(f"{len(t)} {what} for {len(cfg.exits)} exits: give one per exit")
    return t


@dataclass
class EdgeResult:
    """What the edge decided for a batch of N samples."""

    predictions: torch.Tensor  # (N,) answer of the last exit each sample reached (-1 if it reached none)
    decided_at: torch.Tensor  # (N,) exit index k, or CLOUD for samples that must go on
    entropies: torch.Tensor  # (N, K) entropy at each exit, NaN where the sample did not reach it
    features: torch.Tensor  # (R, C, H, W) edge output of the R samples that did not exit
    remaining: torch.Tensor  # (R,) their indices in the batch


@dataclass
class _Algorithm1:
    """The state of Algorithm 1 over one batch, updated at each exit (``EdgeNet.decide``'s callback)."""

    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...]
    n: int
    k: int
    device: torch.device
    idx: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.preds = torch.full((self.n,), -1, dtype=torch.long, device=self.device)
        self.decided = torch.full((self.n,), CLOUD, dtype=torch.long, device=self.device)
        self.ents = torch.full((self.n, self.k), float("nan"), device=self.device)
        self.idx = torch.arange(self.n, device=self.device)

    def __call__(self, j: int, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        stop, e = exits_here(logits, self.thresholds[j], self.temperatures[j])
        self.ents[self.idx, j] = e
        self.preds[self.idx] = logits.argmax(1)
        self.decided[self.idx[stop]] = j
        self.idx = self.idx[~stop]
        return ~stop


class EdgeNet(_Walk):
    """The edge half: normalization, float stem, the first ``edge_layers`` (quantized) block convs, the exits."""

    def __init__(self, cfg: HybridConfig, normalize: nn.Module, stem: nn.Module, blocks: nn.ModuleList,
                 exits: nn.ModuleDict, boundary: int | None = None):
        super().__init__()
        self.cfg, self.normalize, self.stem, self.blocks, self.exits = cfg, normalize, stem, blocks, exits
        self.boundary = cfg.edge_blocks if boundary is None else boundary  # the block the cloud starts at

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return feature_shape_at(self.cfg, self.boundary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features sent to the cloud (every sample, no exits taken)."""
        return self.walk(x)

    @torch.no_grad()
    def decide(self, x: torch.Tensor, thresholds, temperatures=None) -> EdgeResult:
        """Algorithm 1 at the edge on a batch: samples stop at the first exit whose entropy is below threshold."""
        _check_images(x, self.cfg)
        thr = resolve_thresholds(self.cfg, thresholds)
        temps = (1.0,) * len(thr) if temperatures is None else resolve_thresholds(self.cfg, temperatures, "temperatures")
        state = _Algorithm1(thr, temps, x.shape[0], len(self.cfg.exits), x.device)
        h = self.walk(x, state)
        return EdgeResult(state.preds, state.decided, state.ents, h, state.idx)


class CloudNet(_Walk):
    """The cloud half: the remaining float blocks and the final classifier."""

    def __init__(self, cfg: HybridConfig, blocks: nn.ModuleList, head: nn.Module, first_block: int | None = None):
        super().__init__()
        self.cfg, self.blocks, self.head = cfg, blocks, head
        self.first_block = cfg.edge_blocks if first_block is None else first_block
        self.exits = nn.ModuleDict()
        self._in_shape = feature_shape_at(cfg, self.first_block)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.dim() != 4 or tuple(h.shape[1:]) != self._in_shape:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            want = ", ".join(map(str, self._in_shape))
            raise InputShapeError(f"cloud half expects edge features of shape (N, {want}), got {got}")
        return self.head(self.walk(h))


@dataclass
class Decisions:
    predictions: torch.Tensor  # (N,)
    decided_at: torch.Tensor  # (N,) exit index k or CLOUD
    entropies: torch.Tensor  # (N, K), NaN where not reached


@torch.no_grad()
def conditional_inference(edge: EdgeNet, cloud: CloudNet, x: torch.Tensor, thresholds, temperatures=None) -> Decisions:
    """Algorithm 1 on a batch: the cloud half runs once, on the sub-batch that did not exit (if any)."""
    r = edge.decide(x, thresholds, temperatures)
    preds = r.predictions.clone()
    if r.remaining.numel():
        preds[r.remaining] = cloud(r.features).argmax(1)
    return Decisions(preds, r.decided_at, r.entropies)
