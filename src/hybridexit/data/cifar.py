"""CIFAR-10/100 from the official python archives (local, or downloaded with an MD5 check), as uint8 splits.

The official archives hold Python pickles. We never unpickle them unrestricted: ``RestrictedUnpickler`` admits
only what those files contain (dicts, lists, strings, numbers, numpy arrays) and refuses any other global.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError
from .splits import Dataset, DataWarning, Split, checksum, content_checksum

DATASETS = {
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
        "test": ["test_batch"],
        "label_key": "labels",
        "meta": ("batches.meta", "label_names"),
        "num_classes": 10,
        # content_checksum(train, test) of the official archive's decoded images and labels (any image order)
        "content_sha256": "6896d3bfe0fef2407fcae6a1ec4b3b4d6357d704b44d53a0584fad11cd527af7",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "meta": ("meta", "fine_label_names"),
        "num_classes": 100,
        "content_sha256": "1bbae24071b157759a704170f8f69c9f5bd52b7f799fd9fa8fd3468d30a6e476",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: builtin containers, numbers, strings and numpy arrays only."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not part of a CIFAR batch")


def safe_load_pickle(data: bytes, source: str) -> dict:
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{source}: unsafe or corrupted pickle ({e})") from None
    except Exception as e:  # truncated / garbage
        raise DatasetError(f"{source}: corrupted file, cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: corrupted file, expected a dict of arrays, got {type(obj).__name__}")
    return obj



def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hybridexit"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``--data-dir``, then ``$HYBRIDEXIT_DATA``, then the user cache directory."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get("HYBRIDEXIT_DATA"):
        return Path(os.environ["HYBRIDEXIT_DATA"])
    return default_cache_dir()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _members_from_folder(folder: Path, names: list[str]) -> dict[str, bytes]:
    out = {}
    for n in names:
        p = folder / n
        if not p.is_file():
            raise DatasetError(f"{folder}: missing {n}; the folder is incomplete, re-extract the official archive")
        out[n] = p.read_bytes()
    return out


def _members_from_archive(archive: Path, folder: str, names: list[str]) -> dict[str, bytes]:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            out = {}
            for n in names:
                f = tar.extractfile(f"{folder}/{n}")
                if f is None:
                    raise KeyError(n)
                out[n] = f.read()
            return out
    except (tarfile.TarError, OSError, EOFError, KeyError) as e:
        raise DatasetError(f"{archive}: corrupted or not the official archive ({type(e).__name__}: {e})") from None


def download(name: str, dest: Path) -> Path:
    """Download the official archive into ``dest`` and verify its MD5; a mismatch is refused."""
    spec = DATASETS[name]
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / spec["archive"]
    tmp = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(spec["url"], timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        raise DatasetError(f"could not download {spec['url']} ({e}); put {spec['archive']} or its extracted "
                           f"folder {spec['folder']}/ in {dest} or pass --data-dir") from None
    got = _md5(tmp.read_bytes())
    if got != spec["md5"]:
        tmp.unlink()
        raise DatasetError(f"downloaded {spec['archive']} has MD5 {got}, expected {spec['md5']}: refused")
    os.replace(tmp, target)
    return target


def _decode(blob: dict, label_key: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.asarray(blob["data"], dtype=np.uint8)
        labels = np.asarray(blob[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"data {data.shape}, labels {labels.shape}")
    except (KeyError, ValueError, TypeError) as e:
        raise DatasetError(f"{source}: corrupted batch ({type(e).__name__}: {e})") from None
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, data_dir=None, download_ok: bool = True) -> Dataset:
    """Load CIFAR-10 or CIFAR-100 from the extracted folder or the archive in the data directory."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or an image folder")
    spec = DATASETS[name]
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"data folder {root} is a file: give the folder that holds {spec['archive']} or "
                           f"{spec['folder']}/")
    if not root.exists() and root != default_cache_dir():  # only the cache is created (a typo is not)
        raise DatasetError(f"data folder {root} does not exist: create it, or leave --data-dir and HYBRIDEXIT_DATA "
                           f"unset to use the cache {default_cache_dir()}")
    folder, archive = root / spec["folder"], root / spec["archive"]
    names = spec["train"] + spec["test"] + [spec["meta"][0]]
    if folder.is_dir():
        members, source = _members_from_folder(folder, names), str(folder)
    else:
        if not archive.is_file():
            if not download_ok:
                raise DatasetError(f"{name} not found: looked for {folder} and {archive}. Pass --data-dir DIR "
                                   f"holding {spec['archive']} or its extracted {spec['folder']}/, or set HYBRIDEXIT_DATA")
            download(name, root)
        members, source = _members_from_archive(archive, spec["folder"], names), str(archive)
    parts = {}
    for split in ("train", "test"):
        xs, ys = zip(*(_decode(safe_load_pickle(members[n], f"{source}/{n}"), spec["label_key"], f"{source}/{n}")
                       for n in spec[split]))
        parts[split] = Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), split)
    meta = safe_load_pickle(members[spec["meta"][0]], f"{source}/{spec['meta'][0]}")
    classes = [str(c) for c in meta.get(spec["meta"][1], [])] or [str(i) for i in range(spec["num_classes"])]
    content = content_checksum(parts["train"], parts["test"])
    if content != spec["content_sha256"]:  # copies in another order or format are fine: pixels and labels decide
        warnings.warn(f"{source}: the images or labels are not the official {name} content (checksum of the decoded "
                      f"images differs); using them anyway", DataWarning, stacklevel=2)
    return Dataset(name, parts["train"], parts["test"], classes, spec["mean"], spec["std"],
                   checksum(parts["train"], parts["test"]), source, content)

