"""Which data: CIFAR-10/100 (``data.cifar``) or a class-per-folder image tree (``data.folders``), chosen by name
on the command line or by a checkpoint's record of its data (``Dataset.record()`` in its config.json), so that
every command on a checkpoint reads the same images with the same preprocessing.

The module also keeps the names it exported before the data code was split into ``cifar``, ``splits``, ``images``,
``folders`` and ``augment`` (``from hybridexit.data.datasets import load_cifar`` keeps working).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from ..errors import DatasetError
from .augment import augment
from .cifar import (
    DATASETS,
    RestrictedUnpickler,
    default_cache_dir,
    download,
    load_cifar,
    resolve_data_dir,
    safe_load_pickle,
)
from .folders import is_class_folder_tree, load_class_folders, load_image_folder
from .images import image_extensions, is_image_file, load_image_files
from .splits import (
    Dataset,
    DataWarning,
    Split,
    batches,
    checksum,
    content_checksum,
    find_images,
    get_split,
    image_ids,
    train_val_split,
)

FOLDER = "folder"  # the dataset name that asks for a class-folder tree
NAMES = (*DATASETS, FOLDER)

__all__ = ["DATASETS", "FOLDER", "NAMES", "DataWarning", "Dataset", "RestrictedUnpickler", "Split", "augment",
           "batches", "checksum", "content_checksum", "default_cache_dir", "download", "find_images", "get_split",
           "image_extensions", "image_ids", "is_image_file", "load_cifar", "load_dataset", "load_image_files",
           "load_image_folder", "load_recorded", "resolve_data_dir", "safe_load_pickle",
           "train_val_split"]


def _stats(mean, std) -> tuple | None:
    if (mean is None) != (std is None):
        raise DatasetError("give both the mean and the std (one value per channel each), or neither")
    return None if mean is None else (tuple(float(v) for v in mean), tuple(float(v) for v in std))


def load_dataset(name: str | None, data_dir=None, image_size: int | None = None, mean=None, std=None) -> Dataset:
    """The dataset to train on. ``name``: cifar10, cifar100, ``folder`` (a class-folder tree in ``data_dir``), or
    None: a class-folder tree when ``data_dir`` holds one, else cifar10. ``image_size``: the side images are
    resized to (class folders; CIFAR is 32). ``mean``/``std``: normalization statistics instead of the dataset's
    (CIFAR's published ones, a folder's computed from its training images)."""
    stats = _stats(mean, std)
    if name is None:
        name = FOLDER if data_dir and is_class_folder_tree(data_dir) else "cifar10"
    if name == FOLDER:
        if not data_dir:
            raise DatasetError("a class-folder dataset needs --data-dir ROOT (ROOT/train/<class>/*.png with val/ or "
                               "test/, or ROOT/<class>/*.png)")
        if not is_class_folder_tree(data_dir):
            raise DatasetError(f"{data_dir} holds no class folders with images: expected ROOT/train/<class>/*.png "
                               f"(with val/ or test/) or ROOT/<class>/*.png")
        return load_class_folders(data_dir, image_size, mean=stats and stats[0], std=stats and stats[1])
    if image_size not in (None, 32):
        raise DatasetError(f"{name} images are 32x32: --image-size {image_size} applies to class-folder datasets")
    ds = load_cifar(name, data_dir)
    return ds if stats is None else dataclasses.replace(ds, mean=stats[0], std=stats[1])


def load_recorded(record: dict | None, data_dir=None) -> Dataset:
    """The data a checkpoint was trained on, from its record (config.json's ``data``; a record without ``kind`` is
    CIFAR's): CIFAR from ``data_dir`` (or $HYBRIDEXIT_DATA, the cache); a class-folder tree from ``data_dir``, else
    from the folder recorded at training, at the recorded image size, class order and statistics."""
    record = record or {}
    if record.get("kind", "cifar") == "cifar":
        return load_cifar(record.get("name", "cifar10"), data_dir)
    root = data_dir or record.get("root")
    if not root or not Path(root).is_dir():
        raise DatasetError(f"this checkpoint was trained on the class-folder dataset {record.get('root')!r}, which is "
                           f"not here: give its folder with --data-dir")
    ds = load_class_folders(root, record["image_size"], record["classes"], record["mean"], record["std"],
                            record.get("name"))
    if record.get("content_checksum") and ds.content != record["content_checksum"]:
        warnings.warn(f"{root}: not the images this checkpoint was trained on (content checksum differs); its "
                      f"validation images are looked up by content", DataWarning, stacklevel=2)
    return ds
