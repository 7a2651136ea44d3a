"""``q1`` ... ``q4``: per-channel clipped uniform quantization, clip ranges chosen on validation features."""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from ..errors import ConfigError, CorruptPayload, UnknownCodec, WrongShape
from .base import Codec, check_batch, unzstd, zstd


class ClippedUniform(Codec):
    """b-bit uniform quantization of each channel over a clip range [lo, hi] chosen on validation data."""

    FORMAT = 1

    def __init__(self, bits: int, lo, hi):
        if bits not in (1, 2, 3, 4):
            raise ConfigError(f"clipped uniform codec: bits={bits}, use 1 to 4")
        # the ranges as the frame carries them (float16), so both sides quantize with the same numbers
        lo = torch.as_tensor(lo, dtype=torch.float32).half().float()
        hi = torch.as_tensor(hi, dtype=torch.float32).half().float()
        if lo.dim() != 1 or lo.shape != hi.shape or not torch.isfinite(lo).all() or not torch.isfinite(hi).all():
            raise CorruptPayload("clip ranges must be two finite vectors of one value per channel")
        if not (hi > lo).all():
            raise CorruptPayload("every clip range must have hi > lo")
        self.bits, self.lo, self.hi = bits, lo, hi
        self.name = f"q{bits}"

    @property
    def levels(self) -> int:
        return 2**self.bits

    @classmethod
    def calibrate(cls, bits: int, features: torch.Tensor, p: float = 0.005) -> ClippedUniform:
        """Clip each channel at its p and 1 - p quantiles over ``features`` (validation split, (N, C, H, W))."""
        x = features.transpose(0, 1).reshape(features.shape[1], -1).float()
        if x.shape[1] > 2_000_000:  # quantiles of a strided subsample: torch.quantile caps its input size
            x = x[:, :: math.ceil(x.shape[1] / 2_000_000)]
        return cls(bits, torch.quantile(x, p, dim=1), torch.quantile(x, 1 - p, dim=1))

    def params(self) -> bytes:
        return (struct.pack("<BBH", self.FORMAT, self.bits, len(self.lo))
                + self.lo.half().numpy().astype("<f2").tobytes() + self.hi.half().numpy().astype("<f2").tobytes())

    @classmethod
    def from_params(cls, params: bytes) -> ClippedUniform:
        if len(params) < 4:
            raise CorruptPayload("q codec parameters truncated")
        fmt, bits, c = struct.unpack_from("<BBH", params)
        if fmt != cls.FORMAT:
            raise UnknownCodec(f"q codec parameter format {fmt} is not supported (this side: {cls.FORMAT})")
        if len(params) != 4 + 4 * c:
            raise CorruptPayload(f"q codec parameters: {len(params)} bytes for {c} channels, need {4 + 4 * c}")
        lo = np.frombuffer(params, "<f2", c, 4).astype(np.float32)
        hi = np.frombuffer(params, "<f2", c, 4 + 2 * c).astype(np.float32)
        if bits not in (1, 2, 3, 4):
            raise CorruptPayload(f"q codec: bits={bits} is not 1 to 4")
        return cls(bits, torch.from_numpy(lo), torch.from_numpy(hi))

    def _step(self):
        return ((self.hi - self.lo) / self.levels)[None, :, None, None]

    def _check_channels(self, shape):
        if shape[1] != len(self.lo):
            raise WrongShape(f"{self.name} codec has clip ranges for {len(self.lo)} channels, the tensor has {shape[1]}")

    def symbols(self, x: torch.Tensor) -> torch.Tensor:
        x = check_batch(x, self.name)
        self._check_channels(x.shape)
        s = torch.floor((x - self.lo[None, :, None, None]) / self._step()).clamp_(0, self.levels - 1)
        return s.to(torch.uint8)

    def encode(self, x):
        sym = self.symbols(x).numpy()
        out = []
        for s in sym:
            bits = np.unpackbits(s.reshape(-1, 1), axis=1)[:, 8 - self.bits:]
            out.append(zstd(np.packbits(bits.reshape(-1)).tobytes()))
        return out

    def decode(self, payloads, shape):
        self._check_channels(shape)
        n = math.prod(shape[1:])
        need = math.ceil(n * self.bits / 8)
        rows = []
        for p in payloads:
            raw = np.frombuffer(unzstd(p, need), np.uint8)
            bits = np.unpackbits(raw)[: n * self.bits].reshape(n, self.bits)
            rows.append((bits * (1 << np.arange(self.bits - 1, -1, -1))).sum(1).astype(np.float32))
        sym = torch.from_numpy(np.stack(rows)).reshape(len(payloads), *shape[1:])
        return self.lo[None, :, None, None] + (sym + 0.5) * self._step()

    def error_bound(self, x):
        lo, hi = self.lo[None, :, None, None], self.hi[None, :, None, None]
        outside = (lo - x).clamp_min(0) + (x - hi).clamp_min(0)
        return self._step() / 2 + outside + 1e-5 * (x.abs() + hi.abs() + lo.abs())

    def describe(self):
        return {"name": self.name, "lossless": False, "bits": self.bits, "channels": len(self.lo),
                "clip_lo": self.lo.tolist(), "clip_hi": self.hi.tolist()}
