"""BatchNorm folded as every engine applies it: one fused multiply-add per element, as PyTorch's CPU BatchNorm."""

from __future__ import annotations

import torch
from torch import nn


def fold_bn(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with bn(x) = fma(x, a, b) in eval mode: float32, as PyTorch's CPU BatchNorm folds them
    (a = rsqrt(var + eps) * weight, b = fma(-mean, a, bias); the product is exact in float64)."""
    a = torch.rsqrt(bn.running_var.float() + bn.eps) * bn.weight.float()
    b = (bn.bias.double() - bn.running_mean.double() * a.double()).float()
    return a.contiguous(), b.contiguous()
