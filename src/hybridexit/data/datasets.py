"""CIFAR-10/100 from the official python archives (local or downloaded with checksum), image folders,
a deterministic validation split, and augmentation on whole uint8 batches.

The official archives hold Python pickles. We never unpickle them unrestricted: ``RestrictedUnpickler`` admits
only what those files contain (dicts, lists, strings, numbers, numpy arrays) and refuses any other global.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DatasetError

# Official archives (https://www.cs.toronto.edu/~kriz/cifar.html), their MD5s (checked on download) and content checksums.
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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


_NOT_DECODED = {"MPEG"}  # Pillow identifies these files but cannot decode their pixels


@functools.lru_cache(maxsize=1)
def image_extensions() -> tuple[str, ...]:
    """File extensions of every format Pillow can decode (its registered readers, less stubs that need a handler),
    lower case, sorted: ``.png``, ``.jpg``, ``.gif``, ``.tif``, ``.webp`` ..."""
    from PIL import Image, ImageFile

    Image.init()
    readable = {f for f, (cls, _) in Image.OPEN.items()
                if not (isinstance(cls, type) and issubclass(cls, ImageFile.StubImageFile)) and f not in _NOT_DECODED}
    return tuple(sorted(e.lower() for e, f in Image.registered_extensions().items() if f in readable))


def is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in image_extensions()


def _rgb8(im) -> np.ndarray:
    """An opened image as uint8 RGB (H, W, 3). Deep grey levels (16-bit PNGs and TIFFs, 32-bit integer and float
    images) are scaled to 8 bits, not clipped: Pillow's own ``convert("RGB")`` saturates them to white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) <= 65535 else float(2 ** 32 - 1)
        grey = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
    elif im.mode == "F":  # float: [0, 1] when it fits there, else 8-bit levels
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        grey = np.clip(np.round(a * 255.0 if a.max(initial=0) <= 1.0 else a), 0, 255).astype(np.uint8)
    else:
        return np.asarray(im.convert("RGB"))
    return np.repeat(grey[:, :, None], 3, axis=2)


def load_image_files(paths: list[Path], size: int = 32) -> torch.Tensor:
    """Read image files into a uint8 (N, 3, size, size) tensor (resized when needed; the first frame of an
    animation)."""
    from PIL import Image

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                rgb = Image.fromarray(_rgb8(im))
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(rgb).transpose(2, 0, 1)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what PIL raises on bad files
            raise DatasetError(f"{p}: not a readable image ({e})") from None
    return torch.from_numpy(out)


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
    split is derived from ``seed`` and image positions (new training runs, which then record it)."""
    if split == "test":
        return ds.test
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


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, standardized per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - m) / s


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


def batches(split: Split, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None):
    """Yield (uint8 images, labels) batches; the last one may be smaller."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield split.images[idx], split.labels[idx]
