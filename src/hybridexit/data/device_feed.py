"""Training batches from a split held on the training device: the uint8 images and labels are copied there once,
each epoch's shuffle and crop/flip parameters are drawn on the host in one go, and the batches are gathered,
padded, cropped and flipped on the device (no per-sample Python, no host-device copy per batch).

The random draws are the host path's (``data.batches`` then ``data.augment``, batch after batch) in the same order
from the same generator, so on any device the crops, flips and batch order are exactly those of the host path with
that seed; on the CPU device the batches are bit-identical to it. An augmentation other than pad-crop-flip (the
``augment`` argument: a ``f(uint8 batch, generator)`` such as the random-resized crop for large images) is applied
batch by batch to the device-resident images, with its own draws.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

Augment = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def draw_crop_flip(sizes: list[int], generator: torch.Generator | None, pad: int) -> torch.Tensor:
    """(3, sum(sizes)) int64: the vertical offset, horizontal offset and flip (0/1) of every image of batches of
    ``sizes``, drawn batch after batch exactly as ``augment`` draws them for each batch."""
    parts = []
    for n in sizes:
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        parts.append(torch.stack([oy, ox, flip.long()]))
    return torch.cat(parts, 1) if parts else torch.zeros(3, 0, dtype=torch.long)


def crop_flip(images: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by ``pad``, crop back to the input size at the offsets of ``params`` (3, n) and flip horizontally
    where its third row is 1; one gather over the whole uint8 batch, on the batch's device."""
    n, c, h, w = images.shape
    wide = w + 2 * pad
    flat = F.pad(images, (pad, pad, pad, pad)).flatten(2)  # (n, c, (h + 2p) * (w + 2p))
    oy, ox, flip = params[0], params[1], params[2].bool()
    rows = oy[:, None] + torch.arange(h, device=images.device)  # (n, h) rows of the padded image
    cols = ox[:, None] + torch.arange(w, device=images.device)  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * wide + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return flat.gather(2, index).view(n, c, h, w)


class DeviceFeed:
    """A training split resident on ``device``; ``epoch`` yields its shuffled, augmented batches there.

    ``augment`` None: pad-crop-flip with ``pad`` (CIFAR's, pad 4). Else that augmentation, per batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device, pad: int = 4,
                 augment: Augment | None = None):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.pad, self.augment = pad, augment

    def __len__(self) -> int:
        return len(self.labels)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned: the copy queues behind the step in flight instead of waiting for it
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def epoch(self, batch_size: int, generator: torch.Generator | None, drop_last: bool = False
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's (uint8 images, labels) batches on the device, in ``data.batches``' order for ``generator``;
        ``drop_last``: without the last, smaller batch (and without drawing its augmentation)."""
        n = len(self)
        order = torch.randperm(n, generator=generator)
        sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        if drop_last:
            sizes = [s for s in sizes if s == batch_size]
        order = self._to_device(order)
        params = None
        if self.augment is None:
            params = self._to_device(draw_crop_flip(sizes, generator, self.pad))
        start = 0
        for size in sizes:
            idx = order[start:start + size]
            images = self.images[idx]
            if params is None:
                images = self.augment(images, generator)
            else:
                images = crop_flip(images, params[:, start:start + size], self.pad)
            yield images, self.labels[idx]
            start += size
