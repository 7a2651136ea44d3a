"""Splits and datasets as uint8 tensors in memory; samples identified by content (a hash of pixels and label), so a
validation split recorded by content is the same in any copy of the data, in any order; batching.

Memory: a dataset is held whole as uint8 (N, 3, S, S), N x 3 x S^2 bytes (CIFAR-10: 180 MB; 10,000 images at 64x64:
123 MB; at 224x224: 1.5 GB). Fine for small and medium sets; larger ones need a smaller ``--image-size`` or a subset.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DatasetError


@dataclass
class Split:
    """Images as uint8 (N, 3, H, W) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str = ""

    def __len__(self):
        return len(self.labels)

    def limit(self, n: int | None) -> "Split":
        return self if n is None else Split(self.images[:n], self.labels[:n], self.name)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    checksum: str  # sha256 of all pixels and labels, train then test (depends on the image order)
    source: str
    content: str = ""  # order-independent checksum of the decoded images and labels (``content_checksum``)
    kind: str = "cifar"  # cifar: an official archive (data.cifar); folder: a class-per-folder tree (data.folders)
    layout: str = ""  # folder: where train, validation and test came from (data.folders)
    # validation samples fixed by the data itself, by content (a val/ folder, or a content-hashed hold-out);
    # None: carved out of train by ``val_size`` and a seed (CIFAR), then recorded by content in each checkpoint
    val_ids: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def record(self) -> dict:
        """What a checkpoint records of its data (config.json's ``data``): enough to load the same data with the
        same preprocessing again (``data.datasets.load_recorded``) and to tell another copy from it."""
        rec = {"name": self.name, "kind": self.kind, "checksum": self.checksum, "content_checksum": self.content,
               "mean": list(self.mean), "std": list(self.std), "classes": list(self.classes),
               "image_size": self.image_size}
        if self.kind != "cifar":
            rec.update(root=self.source, layout=self.layout)
        return rec



class DataWarning(UserWarning):
    """A dataset that loads but is not the official content."""


def image_ids(images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """A 64-bit content hash of each image (uint8 pixels, and its label when given), as int64: finds the same
    sample in any copy, any order. Give the labels to identify samples: CIFAR-100's training set holds identical
    images under different labels."""
    arr = images.contiguous().numpy().reshape(len(images), -1)
    tags = [b""] * len(arr) if labels is None else [int(v).to_bytes(8, "little", signed=True) for v in labels.tolist()]
    ids = [int.from_bytes(hashlib.blake2b(row.tobytes() + t, digest_size=8).digest(), "little", signed=True)
           for row, t in zip(arr, tags)]
    return torch.tensor(ids, dtype=torch.int64)


def content_checksum(*splits: Split) -> str:
    """Order-independent checksum of splits: sha256 over each split's sorted (image hash, label) pairs."""
    h = hashlib.sha256()
    for s in splits:
        pairs = np.stack([image_ids(s.images).numpy(), s.labels.numpy().astype(np.int64)], 1)
        h.update(pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].astype("<i8").tobytes())
    return h.hexdigest()


def checksum(*splits: Split) -> str:
    h = hashlib.sha256()
    for s in splits:
        h.update(s.images.contiguous().numpy().tobytes())
        h.update(s.labels.numpy().astype("<i8").tobytes())
    return h.hexdigest()



def train_val_split(train: Split, val_size: int = 5000, seed: int = 0) -> tuple[Split, Split]:
    """Deterministic hold-out of ``val_size`` training images for calibration (never the test split)."""
    if not 0 <= val_size < len(train):
        raise DatasetError(f"val_size={val_size} must be between 0 and {len(train) - 1}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return Split(train.images[perm[val_size:]], train.labels[perm[val_size:]], "train"), \
        Split(train.images[perm[:val_size]], train.labels[perm[:val_size]], "val")


def find_images(pool: Split, ids: torch.Tensor, what: str) -> torch.Tensor:
    """Indices in ``pool`` of the samples whose content hashes (``image_ids`` with labels) are ``ids``."""
    where: dict[int, list[int]] = {}
    for i, v in enumerate(image_ids(pool.images, pool.labels).tolist()):
        where.setdefault(v, []).append(i)
    idx, missing = [], 0
    for v in ids.tolist():
        cands = where.get(v)
        if cands:
            idx.append(cands.pop())
        else:
            missing += 1
    if missing:
        raise DatasetError(f"{missing} of the {len(ids)} {what} images are not in this copy of the data: use the "
                           f"copy the checkpoint was trained on (its data checksum is in its config.json)")
    return torch.tensor(idx, dtype=torch.long)


def get_split(ds: Dataset, split: str, val_size: int = 5000, seed: int = 0, val_ids: torch.Tensor | None = None) -> Split:
    """A split of the dataset. ``val_ids`` (a checkpoint's record of its validation images by content) finds
    the validation split by content, so it is the same in any copy of the data in any order; without it the
    split is derived from ``seed`` and image positions (new training runs, which then record it). A dataset that
    fixes its own validation samples (``Dataset.val_ids``: a class-folder tree) gives those, whatever ``val_size``."""
    if split == "test":
        return ds.test
    val_ids = ds.val_ids if val_ids is None else val_ids
    if val_ids is not None and split in ("val", "train"):
        vi = find_images(ds.train, val_ids, "validation")
        if split == "val":
            return Split(ds.train.images[vi], ds.train.labels[vi], "val")
        keep = torch.ones(len(ds.train), dtype=torch.bool)
        keep[vi] = False
        return Split(ds.train.images[keep], ds.train.labels[keep], "train")
    tr, va = train_val_split(ds.train, val_size, seed)
    if split == "val":
        return va
    if split == "train":
        return tr
    if split == "train-full":
        return ds.train
    raise DatasetError(f"unknown split {split!r}: use train, val, test or train-full")



def batches(split: Split, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None):
    """Yield (uint8 images, labels) batches; the last one may be smaller."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield split.images[idx], split.labels[idx]
