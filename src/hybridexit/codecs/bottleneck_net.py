"""The learned bottleneck as a module (``Bottleneck``: reduce, quantize, expand; see ``bottleneck``'s docstring for
the arithmetic) and its training configuration (``BottleneckConfig``): what the codec registry (``codecs``) and the
codec recipes (``codec_recipe``) read. Training and export live in ``bottleneck``, which imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# step of the MSE-optimal uniform quantizer of a unit Gaussian with L = 2^bits levels (Max 1960): the initial step
GAUSS_STEP = {1: 1.596, 2: 0.9957, 3: 0.5860, 4: 0.3352}


class Bottleneck(nn.Module):
    """``forward(f)`` = expand(dequantize(quantize(reduce(f)))); ``symbols(f)`` / ``from_symbols(sym)`` split it
    at the wire. ``channels``: C of the edge features; ``code_channels``: c; ``bits``: 1 to 4. ``refine``: a
    residual 3x3 conv on each side (edge: ``f + conv(relu(f))`` before the reduction; cloud: ``g + conv(relu(g))``
    after the expansion), zero-initialized so that a refined bottleneck starts as the plain one; it lets the code
    use each position's neighbourhood."""

    def __init__(self, channels: int, code_channels: int, bits: int, refine: bool = False):
        super().__init__()
        if bits not in GAUSS_STEP:
            raise ConfigError(f"bottleneck bits={bits}: use 1 to 4")
        if not 1 <= code_channels <= channels:
            raise ConfigError(f"bottleneck code_channels={code_channels}: use 1 to {channels}")
        self.channels, self.code_channels, self.bits = channels, code_channels, bits
        self.levels = 2**bits
        self.reduce = nn.Conv2d(channels, code_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(code_channels)
        self.log_step = nn.Parameter(torch.full((code_channels,), math.log(GAUSS_STEP[bits])))
        self.expand = nn.Conv2d(code_channels, channels, 1, bias=True)
        self.refine = bool(refine)
        if self.refine:
            self.enc = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
            self.dec = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
            for conv in (self.enc, self.dec):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def pre_quant(self, f: torch.Tensor) -> torch.Tensor:
        if self.refine:
            f = f + self.enc(F.relu(f))
        return self.bn(self.reduce(f))

    def _expand(self, q: torch.Tensor) -> torch.Tensor:
        g = self.expand(q)
        return g + self.dec(F.relu(g)) if self.refine else g

    def _index(self, z: torch.Tensor) -> torch.Tensor:
        """Signed level index in [-L/2, L/2 - 1] (float), straight-through in training."""
        s = self.log_step.exp()[None, :, None, None]
        t = (z / s - 0.5).clamp(-self.levels / 2, self.levels / 2 - 1)
        return t + (torch.round(t) - t).detach()

    def dequantize(self, index: torch.Tensor) -> torch.Tensor:
        return (index + 0.5) * self.log_step.exp()[None, :, None, None]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self._expand(self.dequantize(self._index(self.pre_quant(f))))

    @torch.no_grad()
    def symbols(self, f: torch.Tensor) -> torch.Tensor:
        """Edge side: uint8 symbols in [0, L) of shape (N, c, H, W)."""
        return (self._index(self.pre_quant(f)) + self.levels // 2).round().to(torch.uint8)

    @torch.no_grad()
    def from_symbols(self, sym: torch.Tensor) -> torch.Tensor:
        """Cloud side: symbols back to a (N, C, H, W) feature map."""
        idx = sym.to(torch.float32) - self.levels // 2
        return self._expand(self.dequantize(idx))

    def spec(self) -> dict:
        """What rebuilds it (``Bottleneck(**spec)``); ``refine`` only when set, so plain codecs keep their record."""
        out = {"channels": self.channels, "code_channels": self.code_channels, "bits": self.bits}
        return {**out, "refine": True} if self.refine else out

    def _refine_macs(self, h: int, w: int) -> int:
        return 9 * self.channels * self.channels * h * w if self.refine else 0

    def edge_macs(self, h: int, w: int) -> int:
        return self.channels * self.code_channels * h * w + self._refine_macs(h, w)

    def cloud_macs(self, h: int, w: int) -> int:
        return self.channels * self.code_channels * h * w + self._refine_macs(h, w)

    @torch.no_grad()
    def init_pca(self, feats: torch.Tensor) -> None:
        """Start from PCA: reduce onto the top-c principal directions of the channel vectors, expand back."""
        x = feats.permute(0, 2, 3, 1).reshape(-1, self.channels).double()
        mu = x.mean(0)
        cov = torch.cov((x - mu).T)
        evals, evecs = torch.linalg.eigh(cov)
        top = evecs[:, evals.argsort(descending=True)[: self.code_channels]].T  # (c, C)
        std = (top @ cov @ top.T).diagonal().clamp_min(1e-12).sqrt()
        self.reduce.weight.copy_(top.float()[:, :, None, None])
        self.bn.running_mean.copy_((top @ mu).float())
        self.bn.running_var.copy_((std**2).float())
        self.expand.weight.copy_((top.T * std[None, :]).float()[:, :, None, None])
        self.expand.bias.copy_(mu.float())


@dataclass(frozen=True)
class BottleneckConfig:
    code_channels: int = 16
    bits: int = 2
    epochs: int = 12
    views: int = 1  # augmented views of the training split whose edge features are cached
    match_blocks: int = 1  # >0: train the first k cloud blocks to reproduce the original's output there (MSE); 0: logits KD
    batch_size: int = 128
    lr: float = 1e-3  # bottleneck (AdamW)
    cloud_lr: float = 2e-4  # cloud half (AdamW)
    weight_decay: float = 0.0
    kd_alpha: float = 0.7
    kd_temperature: float = 2.0
    seed: int = 0
    limit_train: int | None = None  # smoke tests: only the first N training images
    init_from: str | None = None  # a previous run's best.pt (bottleneck + cloud) to start from instead of PCA
    refine: bool = False  # a zero-initialized residual 3x3 conv on each side of the code (Bottleneck)
    tune_cloud: bool = True  # False: the checkpoint's cloud half stays as it is; only the bottleneck learns
    offload_weight: float = 1.0  # loss weight of the training samples the edge offloads at its thresholds (others: 1)

    def __post_init__(self):
        if self.epochs < 1 or self.views < 1 or self.batch_size < 1:
            raise ConfigError("epochs, views and batch_size must be at least 1")
        if self.match_blocks < 0:
            raise ConfigError(f"match_blocks={self.match_blocks} must be >= 0")
        if not 0 <= self.kd_alpha <= 1:
            raise ConfigError(f"kd_alpha={self.kd_alpha} must be in [0, 1]")
        if not self.offload_weight > 0:
            raise ConfigError(f"offload_weight={self.offload_weight} must be > 0")
