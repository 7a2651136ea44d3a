"""Training augmentation on whole uint8 batches (no per-sample Python), chosen by image size as is standard:
pad-crop-flip for small images (CIFAR's: pad 4 at 32x32, pad size/8 in general), random-resized crop and flip for
ImageNet-style sizes; and per-channel normalization statistics of a set of images."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import DatasetError

PAD_CROP_MAX_SIZE = 64  # images up to this side get pad-crop-flip; larger ones random-resized crop + flip
AUGMENTATIONS = ("pad-crop-flip", "random-resized-crop-flip")


def augment(images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, on a whole uint8 batch (no per-sample Python)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dev = images.device
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev)).view(n, 1, h, 1)
    cols = ox[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols).view(n, 1, 1, w)
    return padded[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols]


def random_resized_crop(images: torch.Tensor, generator: torch.Generator | None = None,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random-resized crop and horizontal flip (Inception-style, torchvision's defaults), on a whole uint8 batch:
    per image a box of ``scale`` x its area and aspect ratio in ``ratio`` (log-uniform; clamped to the image), at a
    uniform position, resampled bilinearly to the batch's size; flipped with probability 1/2. Returns uint8."""
    n, _, h, w = images.shape
    dev = images.device
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator)
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=generator)
    aspect = torch.exp(logr)
    bw = torch.sqrt(area * aspect).clamp(max=1.0)  # box width and height, as fractions of the image's side
    bh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - bw) * (2 * torch.rand(n, generator=generator) - 1)  # box centre in [-1, 1] coordinates
    cy = (1 - bh) * (2 * torch.rand(n, generator=generator) - 1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = bw * flip, cx, bh, cy
    grid = F.affine_grid(theta.to(dev), [n, images.shape[1], h, w], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def augmentation_for(size: int) -> str:
    """The standard augmentation for images of this side (``AUGMENTATIONS``)."""
    return AUGMENTATIONS[0] if size <= PAD_CROP_MAX_SIZE else AUGMENTATIONS[1]


def crop_pad(size: int) -> int | None:
    """The padding of pad-crop-flip for images of this side (size / 8: CIFAR's 4 at 32), or None when the size
    takes random-resized crop."""
    return max(1, round(size / 8)) if augmentation_for(size) == AUGMENTATIONS[0] else None


def augmenter(size: int) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """``f(uint8 batch, generator)``: the standard augmentation for images of this side. At 32x32 it is exactly
    CIFAR's ``augment`` (pad 4), so the CIFAR runs' random draws and figures do not change."""
    pad = crop_pad(size)
    if pad is None:
        return random_resized_crop
    return lambda images, generator=None: augment(images, generator, pad)


def channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images on [0, 1] (float64 sums, in chunks)."""
    if len(images) == 0:
        raise DatasetError("no training images to compute normalization statistics from")
    c = images.shape[1]
    s, s2, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(torch.float64).div_(255.0).transpose(0, 1).reshape(c, -1)
        s += x.sum(1)
        s2 += (x * x).sum(1)
        count += x.shape[1]
    mean = s / count
    std = (s2 / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-3)  # a flat channel still divides safely
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
