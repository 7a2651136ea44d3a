"""Image files: which extensions Pillow decodes, and reading files into uint8 (N, 3, S, S) tensors one file at a
time (each decoded, converted to RGB and resized before the next is read, so peak memory is the output tensor plus
one decoded image)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError

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

