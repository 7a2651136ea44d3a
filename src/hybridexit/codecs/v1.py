"""The protocol's original codecs, fp32 / fp16 / int8 (each optionally zstd): the element bytes of a tensor and
back. The wire format puts them behind its v1 header (``runtime/wire.py``); ``V1Codec`` offers them through the
codec interface, one payload per sample.

Decoded payload: fp32 / fp16: the elements in C order. int8: one float32 scale per (dim 0, dim 1) pair, i.e. per
sample and channel, then the int8 elements in C order; value = scale * q, q in [-127, 127].
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import CorruptPayload, UnknownCodec, WrongShape, need
from .base import Codec, check_batch, decompress

V1_NAMES = ("fp32", "fp16", "int8")
CODEC_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
NP = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}
ZSTD_LEVEL = 3


def quantize_int8(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per (dim 0, dim 1): scale = max|x| / 127, q = round(x / scale)."""
    if x.dim() < 2:
        raise WrongShape(f"the int8 codec needs at least 2 dimensions (samples, channels, ...), got {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    flat = x.detach().float().reshape(n, c, -1)
    scale = flat.abs().amax(dim=2) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(flat / safe[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return scale.cpu().numpy().astype("<f4"), q.reshape(x.shape).cpu().numpy()


def decoded_bytes(codec: str, shape: tuple[int, ...]) -> int:
    """Size of the uncompressed element bytes of a ``codec`` tensor of ``shape``."""
    n = math.prod(shape) * NP[CODEC_DTYPE[codec]].itemsize  # exact: a frame's shape may claim anything
    return n + (shape[0] * shape[1] * 4 if codec == "int8" else 0)


def encode_raw(x: torch.Tensor, codec: str, compress: bool = False, level: int = ZSTD_LEVEL) -> bytes:
    """The element bytes of a float tensor with ``codec`` (zstd-compressed with ``compress``)."""
    x = x.detach().to("cpu", torch.float32).contiguous()
    if codec == "fp32":
        raw = x.numpy().astype("<f4", copy=False).tobytes()
    elif codec == "fp16":
        raw = x.numpy().astype("<f2").tobytes()
    elif codec == "int8":
        scale, q = quantize_int8(x)
        raw = scale.tobytes() + q.tobytes()
    else:
        raise UnknownCodec(f"unknown codec {codec!r}: use one of {', '.join(V1_NAMES)}")
    if compress:
        zstandard = need("zstandard", "zstd compression (+zstd)")

        raw = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    return raw


def decode_raw(payload: bytes, codec: str, shape: tuple[int, ...], compressed: bool = False) -> torch.Tensor:
    """Element bytes back to a float32 tensor of ``shape``, checked (length, finite values, int8 range)."""
    expected = decoded_bytes(codec, shape)
    if compressed:
        payload = decompress(payload, expected)
    if len(payload) != expected:
        raise CorruptPayload(f"payload has {len(payload)} bytes, a {codec} tensor of shape {shape} needs {expected}")
    if codec == "int8":
        ns = shape[0] * shape[1]
        scale = np.frombuffer(payload, dtype="<f4", count=ns)
        q = np.frombuffer(payload, dtype="i1", offset=ns * 4).reshape(shape)
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise CorruptPayload("int8 scales must be finite and non-negative")
        if (q == -128).any():
            raise CorruptPayload("int8 values must be in [-127, 127] (symmetric quantization)")
        s = torch.from_numpy(scale.astype(np.float32)).reshape(tuple(shape[:2]) + (1,) * (len(shape) - 2))
        return torch.from_numpy(q.astype(np.float32)) * s
    arr = np.frombuffer(payload, dtype=NP[CODEC_DTYPE[codec]]).reshape(shape)
    if not np.isfinite(arr).all():
        raise CorruptPayload("tensor contains NaN or infinite values")
    return torch.from_numpy(arr.astype(np.float32))


class V1Codec(Codec):
    """The protocol's original fp32 / fp16 / int8 codecs (optionally zstd): each sample's element bytes
    (behind a v1 header on the wire)."""

    def __init__(self, name: str, compress: bool = False):
        if name not in V1_NAMES:
            raise UnknownCodec(f"unknown codec {name!r}: use one of {', '.join(V1_NAMES)} (optionally +zstd)")
        self.base, self.compress = name, compress
        self.name = name + ("+zstd" if compress else "")
        self.lossless = name == "fp32"

    def encode(self, x):
        x = check_batch(x, self.name)
        return [encode_raw(x[i:i + 1], self.base, self.compress) for i in range(len(x))]

    def decode(self, payloads, shape):
        return torch.cat([decode_raw(p, self.base, (1, *shape[1:]), self.compress) for p in payloads])

    def error_bound(self, x):
        if self.base == "fp32":
            return torch.zeros_like(x)
        if self.base == "fp16":
            return x.abs() * 2.0**-11 + 2.0**-25  # round to nearest: half an ulp (relative 2^-11), subnormals
        scale = x.abs().amax(dim=(2, 3), keepdim=True) / 127.0
        return scale / 2 * (1 + 1e-6) + 1e-12
