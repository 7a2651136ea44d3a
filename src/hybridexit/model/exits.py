"""Early-exit heads, softmax entropy, and the exit rule.

An exit is a full-precision linear classifier on pooled features (paper, Sec. II-B). Pooling is average pooling
with kernel 3 / stride 3 as in the authors' code (``pool="k3"``: FC inputs 16x10x10, 32x5x5, 64x2x2 on CIFAR) or
global average pooling (``pool="global"``). We put a BatchNorm and a ReLU before the pooling, as in the final
classifier of a pre-activation ResNet: the BatchNorm folds into the linear layer at inference (no extra MACs) and
makes joint training of an exit on the un-normalized residual stream stable.

Exit capacity (recipe options, docs/recipes.md): the pooling size (``pool="k2"`` / ``"k4"``: kernel = stride 2 or 4,
more or fewer FC inputs than k3) and a hidden layer (``hidden=H``: linear (no bias) -> BatchNorm -> ReLU -> linear,
the BatchNorm folding into the first linear at inference, so its cost is the two linears' MACs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pool_kernel(pool: str) -> int | None:
    """Kernel (= stride) of a ``kN`` exit pool, None for global pooling."""
    return None if pool == "global" else int(pool[1:])


def pooled_size(size: int, pool: str) -> int:
    k = pool_kernel(pool)
    return 1 if k is None else (size - k) // k + 1


class ExitHead(nn.Module):
    bits = 32

    def __init__(self, channels: int, size: int, num_classes: int, pool: str = "k3", hidden: int = 0):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        k = pool_kernel(pool)
        self.pool = nn.AdaptiveAvgPool2d(1) if k is None else nn.AvgPool2d(k, k)
        p = pooled_size(size, pool)
        width = channels * p * p
        self.hidden = None
        if hidden:
            self.hidden = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU())
            width = hidden
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        z = torch.flatten(self.pool(F.relu(self.bn(x))), 1)
        return self.fc(z if self.hidden is None else self.hidden(z))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (natural log) of softmax(logits), one value per row. Range [0, log(num_classes)]."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def exit_rule(entropies: torch.Tensor, threshold: float) -> torch.Tensor:
    """The exit rule on entropies: a sample stops when its exit's entropy is strictly below ``threshold`` (tensors
    broadcast; plain floats give a bool)."""
    return entropies < threshold


def exits_here(logits: torch.Tensor, threshold: float, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The exit rule on an exit's logits: entropy of softmax(logits / temperature), then ``exit_rule``.
    Returns (stop mask, entropies). Every place that decides an exit calls this or ``exit_rule``."""
    h = entropy(logits if temperature == 1.0 else logits.float() / temperature)
    return exit_rule(h, threshold), h
