"""HybridNet (the training view), its split into EdgeNet and CloudNet, and conditional inference (Algorithm 1).

One definition of the network: ``HybridNet`` returns every exit's logits and the final logits for training;
``split()`` turns it into two real modules with their own state dicts. ``EdgeNet.decide`` runs Algorithm 1 on a
batch: after each exit the samples whose entropy is below the exit's threshold stop, and only the others go on
through later edge blocks. ``conditional_inference`` then runs the cloud half on the remaining sub-batch only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, InputShapeError
from .exits import ExitHead, exits_here
from .resnet import ClassifierHead, HybridConfig, block_specs, edge_feature_shape, init_weights, make_blocks, make_stem

CLOUD = -1  # decided_at value for samples answered by the cloud half
FALLBACK = -2  # decided_at value when the cloud failed and the last exit's answer was used (runtime only)


def decided_label(code: int) -> str:
    if code == CLOUD:
        return "cloud"
    if code == FALLBACK:
        return "fallback"
    return f"exit:{code}"


def _check_images(x: torch.Tensor, cfg: HybridConfig) -> None:
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputShapeError(
            f"expected images of shape (N, {want[0]}, {want[1]}, {want[2]}) (float, normalized), got {got}")


def _make_exits(cfg: HybridConfig) -> nn.ModuleDict:
    specs = block_specs(cfg)
    heads = {}
    for e in cfg.exits:
        s = specs[e // 2 - 1]
        heads[str(e)] = ExitHead(s.out_ch, s.out_size, cfg.num_classes, cfg.exit_pool)
    return nn.ModuleDict(heads)


class HybridNet(nn.Module):
    """The whole network, for training: ``forward(x)`` returns ``[exit_0, ..., exit_{K-1}, final]`` logits."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = make_stem(cfg)
        self.blocks = make_blocks(cfg)
        self.exits = _make_exits(cfg)
        self.head = ClassifierHead(block_specs(cfg)[-1].out_ch, cfg.num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_images(x, self.cfg)
        outs = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            key = str(2 * (i + 1))
            if key in self.exits:
                outs.append(self.exits[key](x))
        outs.append(self.head(x))
        return outs

    def backbone_parameters(self):
        """Parameters of the stem, blocks and final head (everything but the exits)."""
        for name, p in self.named_parameters():
            if not name.startswith("exits."):
                yield p

    def cloud_modules(self) -> nn.Sequential:
        """The cloud half as this network's own modules (shared, not copied): the blocks after the edge, then the
        final head. Training it trains this network; ``split()`` gives independent copies instead."""
        return nn.Sequential(*self.blocks[self.cfg.edge_blocks:], self.head)

    def split(self) -> tuple["EdgeNet", "CloudNet"]:
        """Two independent modules (deep copies) whose composition reproduces the whole network."""
        m = self.cfg.edge_blocks
        edge = EdgeNet(self.cfg, copy.deepcopy(self.stem), copy.deepcopy(self.blocks[:m]), copy.deepcopy(self.exits))
        cloud = CloudNet(self.cfg, copy.deepcopy(self.blocks[m:]), copy.deepcopy(self.head))
        return edge.train(self.training), cloud.train(self.training)


@dataclass
class EdgeResult:
    """What the edge decided for a batch of N samples."""

    predictions: torch.Tensor  # (N,) answer of the last exit each sample reached (-1 if it reached none)
    decided_at: torch.Tensor  # (N,) exit index k, or CLOUD for samples that must go on
    entropies: torch.Tensor  # (N, K) entropy at each exit, NaN where the sample did not reach it
    features: torch.Tensor  # (R, C, H, W) edge output of the R samples that did not exit
    remaining: torch.Tensor  # (R,) their indices in the batch


class EdgeNet(nn.Module):
    """The edge half: float stem, the first ``edge_layers`` (quantized) block convs, and the exits."""

    def __init__(self, cfg: HybridConfig, stem: nn.Module, blocks: nn.ModuleList, exits: nn.ModuleDict):
        super().__init__()
        self.cfg, self.stem, self.blocks, self.exits = cfg, stem, blocks, exits

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return edge_feature_shape(self.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features sent to the cloud (every sample, no exits taken)."""
        _check_images(x, self.cfg)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def resolve_thresholds(self, thresholds=None) -> tuple[float, ...]:
        t = tuple(self.cfg.thresholds if thresholds is None else (float(v) for v in thresholds))
        if len(t) != len(self.cfg.exits):
            raise ConfigError(
                f"{len(t)} thresholds for {len(self.cfg.exits)} exits: give one entropy threshold per exit "
                f"(or calibrate the checkpoint with `hybridexit calibrate`)")
        return t

    @torch.no_grad()
    def decide(self, x: torch.Tensor, thresholds=None) -> EdgeResult:
        """Algorithm 1 at the edge on a batch: samples stop at the first exit whose entropy is below threshold."""
        _check_images(x, self.cfg)
        thr = self.resolve_thresholds(thresholds)
        n, k = x.shape[0], len(self.cfg.exits)
        preds = torch.full((n,), -1, dtype=torch.long, device=x.device)
        decided = torch.full((n,), CLOUD, dtype=torch.long, device=x.device)
        ents = torch.full((n, k), float("nan"), device=x.device)
        idx = torch.arange(n, device=x.device)
        h = self.stem(x)
        exit_no = {e: j for j, e in enumerate(self.cfg.exits)}
        for i, block in enumerate(self.blocks):
            if idx.numel() == 0:
                break
            h = block(h)
            layer = 2 * (i + 1)
            if layer in exit_no:
                j = exit_no[layer]
                logits = self.exits[str(layer)](h)
                stop, e = exits_here(logits, thr[j])
                ents[idx, j] = e
                preds[idx] = logits.argmax(1)
                decided[idx[stop]] = j
                h, idx = h[~stop], idx[~stop]
        return EdgeResult(preds, decided, ents, h, idx)


class CloudNet(nn.Module):
    """The cloud half: the remaining float blocks and the final classifier."""

    def __init__(self, cfg: HybridConfig, blocks: nn.ModuleList, head: nn.Module):
        super().__init__()
        self.cfg, self.blocks, self.head = cfg, blocks, head
        self._in_shape = edge_feature_shape(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.dim() != 4 or tuple(h.shape[1:]) != self._in_shape:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            want = ", ".join(map(str, self._in_shape))
            raise InputShapeError(f"cloud half expects edge features of shape (N, {want}), got {got}")
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@dataclass
class Decisions:
    predictions: torch.Tensor  # (N,)
    decided_at: torch.Tensor  # (N,) exit index k or CLOUD
    entropies: torch.Tensor  # (N, K), NaN where not reached


@torch.no_grad()
def conditional_inference(edge: EdgeNet, cloud: CloudNet, x: torch.Tensor, thresholds=None) -> Decisions:
    """Algorithm 1 on a batch: the cloud half runs once, on the sub-batch that did not exit (if any)."""
    r = edge.decide(x, thresholds)
    preds = r.predictions.clone()
    if r.remaining.numel():
        preds[r.remaining] = cloud(r.features).argmax(1)
    return Decisions(preds, r.decided_at, r.entropies)
