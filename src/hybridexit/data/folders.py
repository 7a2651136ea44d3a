"""Class-per-folder image datasets (torchvision's ImageFolder layout), at any image size, as uint8 datasets.

Layouts of ROOT; class names are the sorted folder names of the training tree (or those a checkpoint recorded), and
every other tree must use the same names:

- ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``: test/ is the test split; the validation split (thresholds
  are chosen on it) is a hold-out of train/ chosen by content hash (``VAL_FRACTION``).
- ``ROOT/train/`` and ``ROOT/val/``, no test/: val/ is the held-out split results are reported on (as ImageNet's val
  is), so it plays the test split; the validation split is a hold-out of train/ as above.
- ``ROOT/train/``, ``ROOT/val/`` and ``ROOT/test/``: val/ is the validation split, test/ the test split.
- ``ROOT/<class>/*`` (one tree): split by content hash: ``TEST_FRACTION`` test, then ``VAL_FRACTION`` of the rest
  validation; the same images land in the same split in any copy, in any order, under any file names.

Every image is decoded, converted to RGB and resized (bilinear, the whole image to S x S) one file at a time, so
the peak memory is the uint8 dataset (N x 3 x S^2 bytes) plus one decoded image. Normalization statistics are the
training images' own (train split, validation hold-out excluded) unless given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError
from .augment import channel_stats
from .images import is_image_file, load_image_files
from .splits import Dataset, Split, checksum, content_checksum, image_ids

VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
SPLIT_FOLDERS = ("train", "val", "test")


def _class_dirs(base: Path) -> list[Path]:
    return sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))


def _files(base: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """``base/<class>/*`` image files (sorted) and their class ids; a folder not in ``classes`` is refused."""
    unknown = [d.name for d in _class_dirs(base) if d.name not in classes]
    if unknown:
        raise DatasetError(f"{base}: class folder(s) {', '.join(map(repr, unknown[:5]))} are not among the classes "
                           f"{', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''} (the training tree's, or "
                           f"the checkpoint's): every split must use the same class folders")
    paths, labels = [], []
    for c, cls in enumerate(classes):
        if (base / cls).is_dir():
            found = sorted(p for p in (base / cls).iterdir() if is_image_file(p))
            paths += found
            labels += [c] * len(found)
    if not paths:
        raise DatasetError(f"no images under {base}/<class>/ (any format Pillow reads: .png, .jpg, .gif, .tif ...)")
    return paths, labels


def is_class_folder_tree(root) -> bool:
    """Whether ``root`` holds a class-folder dataset: a train/ tree, or class folders with images in them."""
    root = Path(root)
    if not root.is_dir():
        return False
    if (root / "train").is_dir():
        return any(_class_dirs(root / "train"))
    return any(any(is_image_file(p) for p in d.iterdir()) for d in _class_dirs(root))


def common_image_size(paths: list[Path]) -> int:
    """The side of the images when every one is square and the same size (headers only); else a DatasetError
    asking for ``--image-size``."""
    from PIL import Image

    sizes = set()
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.add(im.size)
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"{p}: not a readable image ({e})") from None
        if len(sizes) > 1:
            break
    (w, h) = next(iter(sizes))
    if len(sizes) > 1 or w != h:
        seen = " and ".join(f"{a}x{b}" for a, b in sorted(sizes))
        raise DatasetError(f"the images are not all square and of one size (e.g. {seen}): give --image-size N (each "
                           f"image is resized to N x N)")
    return w


def hash_holdout(split: Split, fraction: float) -> torch.Tensor:
    """Boolean mask of the ``round(fraction x N)`` samples (at least 1, at most N - 1) of smallest content hash
    (``image_ids`` with labels): the same samples whatever the order or file names."""
    n = len(split)
    if n < 2:
        raise DatasetError(f"{n} image(s) cannot be split into two parts: the dataset needs more images")
    k = min(n - 1, max(1, round(fraction * n)))
    ids = image_ids(split.images, split.labels).numpy()
    order = np.lexsort((split.labels.numpy(), ids))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.from_numpy(order[:k].copy())] = True
    return mask


def _take(split: Split, mask: torch.Tensor, name: str) -> Split:
    return Split(split.images[mask], split.labels[mask], name)


def load_class_folders(root, image_size: int | None = None, classes: list[str] | None = None, mean=None, std=None,
                       name: str | None = None) -> Dataset:
    """A class-folder dataset (layouts in the module docstring) at ``image_size`` (default: the images' own side
    when all are square and equal). ``classes``: the class names in id order (a checkpoint's record; default the
    training tree's sorted folder names). ``mean``/``std``: normalization statistics (default: computed from the
    training images, validation excluded)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    has = {s: (root / s).is_dir() for s in SPLIT_FOLDERS}
    tree = root / "train" if has["train"] else root
    if not has["train"] and (has["val"] or has["test"]):
        raise DatasetError(f"{root} has {'val/' if has['val'] else 'test/'} but no train/: a class-folder dataset is "
                           f"ROOT/train/<class>/ (+ val/ or test/) or one tree ROOT/<class>/")
    classes = list(classes) if classes else [d.name for d in _class_dirs(tree)]
    if len(classes) < 2:
        raise DatasetError(f"{tree}: {len(classes)} class folder(s); a classifier needs at least 2 "
                           f"(ROOT/train/<class>/*.png or ROOT/<class>/*.png)")
    paths, labels = _files(tree, classes)
    size = image_size or common_image_size(paths)

    def read(paths, labels, split):
        return Split(load_image_files(paths, size), torch.tensor(labels, dtype=torch.long), split)

    pool = read(paths, labels, "train")
    val = None
    if has["train"] and has["test"]:
        test = read(*_files(root / "test", classes), "test")
        if has["val"]:  # its own validation split: recorded by content as part of the training pool
            val = read(*_files(root / "val", classes), "val")
            layout = "train/ + val/ (validation) + test/"
        else:
            layout = f"train/ ({VAL_FRACTION:.0%} by content hash: validation) + test/"
    elif has["train"] and has["val"]:
        test = read(*_files(root / "val", classes), "test")
        layout = f"train/ ({VAL_FRACTION:.0%} by content hash: validation) + val/ (the test split)"
    elif has["train"]:
        raise DatasetError(f"{root} has train/ but neither val/ nor test/: add one, or put the class folders directly "
                           f"in {root} to have it split by content")
    else:
        is_test = hash_holdout(pool, TEST_FRACTION)
        test, pool = _take(pool, is_test, "test"), _take(pool, ~is_test, "train")
        layout = f"one tree ({TEST_FRACTION:.0%} by content hash: test; {VAL_FRACTION:.0%} of the rest: validation)"
    if val is None:
        is_val = hash_holdout(pool, VAL_FRACTION)
        val, train = _take(pool, is_val, "val"), _take(pool, ~is_val, "train")
    else:
        train = pool
    if mean is None or std is None:
        mean, std = channel_stats(train.images)
    full = Split(torch.cat([train.images, val.images]), torch.cat([train.labels, val.labels]), "train")
    return Dataset(name or root.resolve().name, full, test, classes, tuple(mean), tuple(std), checksum(full, test),
                   str(root.resolve()), content_checksum(full, test), kind="folder", layout=layout,
                   val_ids=image_ids(val.images, val.labels))


def load_image_folder(root, split: str, size: int = 32, classes: list[str] | None = None) -> Split:
    """``root/<split>/<class>/*.png|jpg``; class ids follow ``classes`` or the sorted folder names."""
    base = Path(root) / split
    if not base.is_dir():
        raise DatasetError(f"image folder {base} not found: expected {root}/<split>/<class>/*.png")
    classes = classes or sorted(d.name for d in base.iterdir() if d.is_dir())
    paths, labels = [], []
    for c, cls in enumerate(classes):
        for p in sorted((base / cls).glob("*")):
            if is_image_file(p):
                paths.append(p)
                labels.append(c)
    if not paths:
        raise DatasetError(f"no images under {base}/<class>/ (any format Pillow reads: .png, .jpg, .gif, .tif ...)")
    return Split(load_image_files(paths, size), torch.tensor(labels, dtype=torch.long), split)

