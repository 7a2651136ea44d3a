"""What an edge answers: inputs as uint8 images with labels (-1 when unknown), from a dataset split or a folder of
image files (flat, unlabelled, or one folder per class); a file that cannot be read stays an input with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DatasetError
from .images import is_image_file, load_image_files


@dataclass
class Inputs:
    images: torch.Tensor  # uint8 (N, 3, S, S), S the network's input size
    labels: torch.Tensor  # int64 (N,), -1 when unknown
    paths: list[str] | None = None
    description: str = ""
    errors: dict[int, str] = field(default_factory=dict)  # index -> why that input could not be read
    skipped: list[str] = field(default_factory=list)  # files of an image folder that are not images (not inputs)

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).all())

    def head(self, n: int | None) -> Inputs:
        """The first ``n`` inputs (all when None)."""
        if n is None:
            return self
        return Inputs(self.images[:n], self.labels[:n], self.paths[:n] if self.paths is not None else None,
                      self.description, {i: e for i, e in self.errors.items() if i < n}, self.skipped)

    @property
    def readable(self) -> list[int]:
        """Indices of the inputs that could be read."""
        return [i for i in range(len(self.labels)) if i not in self.errors]

    def folder_summary(self) -> dict:
        """What an image folder held besides the answered inputs: unreadable files (each with its reason) and files
        skipped as not images; empty for a dataset split."""
        if self.paths is None:
            return {}
        return {"unreadable": [{"path": self.paths[i], "error": e} for i, e in sorted(self.errors.items())],
                "skipped_files": len(self.skipped), "skipped_examples": self.skipped[:5]}


def inputs_from_folder(folder, classes: list[str] | None, size: int = 32) -> Inputs:
    """A folder of image files: ``FOLDER/*.png`` (unlabelled) or ``FOLDER/<class>/*.png`` with class names from
    the checkpoint (labelled); any format Pillow reads, each resized to ``size`` x ``size`` (the network's input
    size: ``HybridConfig.image_size``). A file that cannot be read stays an input, with its reason
    in ``errors``; files that are not images (by extension) are no inputs, listed in ``skipped``."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"--images {root}: not a folder")
    flat = sorted(p for p in root.iterdir() if is_image_file(p))
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and any(is_image_file(p) for p in d.iterdir()))
    if flat and subdirs:
        raise DatasetError(f"{root} has both images and class folders with images: use one layout, "
                           f"FOLDER/*.png (unlabelled) or FOLDER/<class>/*.png (labelled)")
    if subdirs:
        known = list(classes or [])
        paths, labels = [], []
        for d in subdirs:
            if d.name not in known:
                raise DatasetError(f"{d}: {d.name!r} is not a class of this model (classes: {', '.join(known)}); "
                                   f"put unlabelled images directly in {root}")
            for p in sorted(q for q in d.iterdir() if is_image_file(q)):
                paths.append(p)
                labels.append(known.index(d.name))
    elif flat:
        paths, labels = flat, [-1] * len(flat)
    else:
        raise DatasetError(f"no images in {root} (any format Pillow reads: .png, .jpg, .gif, .tif, .webp ...)")
    taken = set(paths)
    skipped = sorted(str(q.relative_to(root)) for d in [root, *subdirs] for q in d.iterdir()
                     if q.is_file() and q not in taken)
    images = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    errors = {}
    for i, p in enumerate(paths):
        try:
            images[i] = load_image_files([p], size)[0]
        except DatasetError as e:
            errors[i] = str(e)
    return Inputs(images, torch.tensor(labels, dtype=torch.long), [str(p.relative_to(root)) for p in paths],
                  f"images in {root}", errors, skipped)
