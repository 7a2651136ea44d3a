"""Feature codecs for the edge -> cloud link, selectable by name: ``get(name, checkpoint=None, ...)``.

Every codec turns a (R, C, H, W) float feature batch into R per-sample byte strings (``encode``) and back
(``decode``), carries its parameters as bytes (``params``: what a frame needs besides the payloads) and states
its error bound (``reference`` is what a round trip must give back, ``error_bound`` how far from it each
element may be). The wire format (``runtime/wire.py``, docs/wire-format.md) carries the codec's name, its
parameters and the per-sample payloads; a receiver rebuilds the codec from them with ``from_frame``.

Registry (``NAMES``):

- ``fp32``, ``fp16``, ``int8`` (each optionally ``+zstd``): the protocol's original codecs; their frames are the
  original ones (``wire.encode(x, fp, codec, compress)``). ``fp32`` is lossless; ``fp16`` rounds to nearest;
  ``int8`` is within half a step of its per-(sample, channel) scale.
- ``q1`` ... ``q4``: per-channel clipped uniform quantization with b bits. The clip range [lo, hi] of each
  channel is chosen on the VALIDATION split (``ClippedUniform.calibrate``: the p and 1 - p quantiles, p chosen
  on validation accuracy); the symbols are bit-packed and zstd-compressed (level 19) per sample. The frame
  carries b and the clip ranges (float16). Bound: half a step inside [lo, hi], plus the clipping distance.
- ``bn``: the learned bottleneck of a checkpoint that carries one (``codec.json`` + ``codec.safetensors``, see
  ``bottleneck.py``), in the checkpoint folder (a codec checkpoint: its cloud half was trained behind the codec and
  reads nothing else) or in its ``codec/`` folder (a codec for the checkpoint's unchanged cloud half, beside the
  other codecs): the edge sends c x H x W symbols of ``bits`` bits, range-coded (``constriction``) coarse to fine
  with a model per (step, channel, context of the known neighbours) (``ContextCoder``, codec format 2; format 1,
  ``SerialContextCoder``, is the first codecs' above/left model), tables estimated on the training split. The
  frame carries the codec format and a digest of the codec's files, so a cloud with other weights refuses it.
  Bound: the round trip equals the bottleneck's own float output (``Bottleneck.forward``
  in eval mode) up to float rounding; the symbols themselves round-trip exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .runtime import wire
from .runtime.wire import CodecMismatch, CorruptPayload, UnknownCodec, WrongShape

V1_NAMES = ("fp32", "fp16", "int8")
QUANT_NAMES = ("q1", "q2", "q3", "q4")
LEARNED = "bn"
NAMES = (*V1_NAMES, *QUANT_NAMES, LEARNED)
CODEC_FILE, CODEC_TENSORS = "codec.json", "codec.safetensors"
DEFAULT_CLIP_P = 0.005  # q codecs: clip at the 0.5 % / 99.5 % quantiles (best of 0.5-5 % on validation, docs/codecs.md)
ZSTD_LEVEL = 19


class Codec:
    """Base class: per-sample payloads, parameters as bytes, a stated error bound."""

    name: str = ""
    lossless: bool = False

    def params(self) -> bytes:
        return b""

    def encode(self, x: torch.Tensor) -> list[bytes]:
        raise NotImplementedError

    def decode(self, payloads: list[bytes], shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """What ``decode(encode(x))`` must give back (within ``error_bound``)."""
        return x

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound on |decode(encode(x)) - reference(x)|."""
        return torch.zeros_like(x)

    def edge_macs(self, shape: tuple[int, int, int]) -> int:
        """Multiply-accumulates the edge spends per sample before coding (a learned reduction), at 32 bits."""
        return 0

    def cloud_macs(self, shape: tuple[int, int, int]) -> int:
        return 0

    def describe(self) -> dict:
        return {"name": self.name, "lossless": self.lossless}


def _check_batch(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.numel() == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise WrongShape(f"{what} encodes a non-empty (R, C, H, W) feature batch, got {got}")
    return x.detach().to("cpu", torch.float32).contiguous()


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)


def _unzstd(data: bytes, expected: int) -> bytes:
    from .runtime.wire import _decompress

    out = _decompress(data, expected)
    if len(out) != expected:
        raise CorruptPayload(f"payload decompresses to {len(out)} bytes, the shape implies {expected}")
    return out


# ---------------------------------------------------------------------------------------------- v1 codecs
class V1Codec(Codec):
    """The protocol's original fp32 / fp16 / int8 codecs (optionally zstd): one v1 frame per sample."""

    def __init__(self, name: str, compress: bool = False):
        if name not in V1_NAMES:
            raise UnknownCodec(f"unknown codec {name!r}: use one of {', '.join(NAMES)}")
        self.base, self.compress = name, compress
        self.name = name + ("+zstd" if compress else "")
        self.lossless = name == "fp32"

    def encode(self, x):
        from .runtime import wire

        x = _check_batch(x, self.name)
        return [wire.encode(x[i:i + 1], "0" * 16, self.base, self.compress) for i in range(len(x))]

    def decode(self, payloads, shape):
        from .runtime import wire

        return torch.cat([wire.decode(p, shape=(1, *shape[1:])) for p in payloads])

    def error_bound(self, x):
        if self.base == "fp32":
            return torch.zeros_like(x)
        if self.base == "fp16":
            return x.abs() * 2.0**-11 + 2.0**-25  # round to nearest: half an ulp (relative 2^-11), subnormals
        scale = x.abs().amax(dim=(2, 3), keepdim=True) / 127.0
        return scale / 2 * (1 + 1e-6) + 1e-12


# ---------------------------------------------------------------------------------------------- q1..q4
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
        x = _check_batch(x, self.name)
        self._check_channels(x.shape)
        s = torch.floor((x - self.lo[None, :, None, None]) / self._step()).clamp_(0, self.levels - 1)
        return s.to(torch.uint8)

    def encode(self, x):
        sym = self.symbols(x).numpy()
        out = []
        for s in sym:
            bits = np.unpackbits(s.reshape(-1, 1), axis=1)[:, 8 - self.bits:]
            out.append(_zstd(np.packbits(bits.reshape(-1)).tobytes()))
        return out

    def decode(self, payloads, shape):
        self._check_channels(shape)
        n = math.prod(shape[1:])
        need = math.ceil(n * self.bits / 8)
        rows = []
        for p in payloads:
            raw = np.frombuffer(_unzstd(p, need), np.uint8)
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


# ---------------------------------------------------------------------------------------------- bn (learned)
def _coding_steps(h: int, w: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The coding order of an h x w grid, coarse to fine, as steps whose symbols are coded together (each a vector
    of flat positions and an (n, 4) array of the flat positions of their context neighbours, ``h * w`` where a
    neighbour falls outside the grid). Step 0: the grid of stride S (S the largest power of two that keeps at least
    16 positions; no neighbours). Then for t = S/2, ..., 1: the centres of the stride-2t grid's cells, whose 4
    diagonal neighbours at distance t are known, and the rest of the stride-t grid, whose 4 axial neighbours at
    distance t are known. 16 x 16: S = 4, 5 steps."""
    s = 1
    while math.ceil(h / (2 * s)) * math.ceil(w / (2 * s)) >= 16:
        s *= 2
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    steps = [((yy % s == 0) & (xx % s == 0), ())]
    t = s // 2
    while t >= 1:
        steps.append(((yy % (2 * t) == t) & (xx % (2 * t) == t), ((-t, -t), (-t, t), (t, -t), (t, t))))
        steps.append(((yy % t == 0) & (xx % t == 0) & ((yy // t) % 2 != (xx // t) % 2), ((-t, 0), (t, 0), (0, -t), (0, t))))
        t //= 2
    out = []
    for mask, offsets in steps:
        ys, xs = np.nonzero(mask)
        nbr = np.full((len(ys), 4), h * w, np.int64)
        for k, (dy, dx) in enumerate(offsets):
            y2, x2 = ys + dy, xs + dx
            ok = (y2 >= 0) & (y2 < h) & (x2 >= 0) & (x2 < w)
            nbr[ok, k] = (y2 * w + x2)[ok]
        out.append((ys * w + xs, nbr))
    return out


@dataclass(frozen=True)
class _Plan:
    """What one (c, h, w) symbol map is coded with, all symbols in coding order (step, channel, position):
    ``idx`` their flat indices in the (c, h*w + 1) map (a zero column last, for missing neighbours), ``nbr`` their
    neighbours' (4, n), ``row`` their table row before the neighbours' sum is added, ``cuts`` where each step ends."""

    idx: np.ndarray
    nbr: np.ndarray
    row: np.ndarray
    cuts: tuple[int, ...]


class ContextCoder:
    """Range coding (``constriction``) of (c, H, W) symbols in [0, L), coarse to fine (``_coding_steps``): a symbol's
    model is a categorical table per (step, channel, context), the context being how many of its 4 neighbours exist
    and the sum of their symbols. Every symbol of a step depends only on earlier steps, so encoding is one vectorized
    call and decoding one call per step (5 for 16 x 16). A last symbol, uniform over 256 values, is a check byte
    of the symbols (CRC-32's low byte): a truncated or altered payload is refused (all but 1 in 256). Trailing zero
    words, which the decoder reads as implied, are dropped, so a payload that ends with one was padded: refused."""

    FORMAT = 2

    def __init__(self, probs: torch.Tensor):
        p = probs.detach().to(torch.float32).numpy()
        if p.ndim != 4 or not np.isfinite(p).all() or (p < 0).any() or (p.sum(3) <= 0).any():
            raise ConfigError(f"context coder tables have shape {p.shape}: need (steps, c, contexts, L), finite, >= 0")
        self.steps, self.channels, self.contexts, self.levels = p.shape
        if self.contexts != self.context_count(self.levels):
            raise ConfigError(f"context coder tables have {self.contexts} contexts; {self.levels} levels need "
                              f"{self.context_count(self.levels)}")
        self.table = np.ascontiguousarray((p / p.sum(3, keepdims=True)).reshape(-1, self.levels), np.float32)
        self._plans: dict[tuple[int, int, int], _Plan] = {}

    @staticmethod
    def _offsets(levels: int) -> np.ndarray:
        """First context of each neighbour count k = 0..4 (k neighbours sum to 0 .. k(L-1)); the last: the total."""
        return np.concatenate([[0], np.cumsum([k * (levels - 1) + 1 for k in range(5)])])

    @staticmethod
    def context_count(levels: int) -> int:
        return int(ContextCoder._offsets(levels)[-1])

    @staticmethod
    def plan(shape: tuple[int, int, int], levels: int) -> _Plan:
        c, h, w = shape
        off = ContextCoder._offsets(levels)
        steps = _coding_steps(h, w)
        ch = np.arange(c)[:, None]
        idx, nbr, row, cuts = [], [], [], []
        for k, (pos, nb) in enumerate(steps):
            base = ch * (h * w + 1)
            idx.append((base + pos[None, :]).reshape(-1))
            nbr.append((base[:, :, None] + nb[None]).reshape(-1, 4))
            count = (nb < h * w).sum(1)
            row.append((((k * c + ch) * ContextCoder.context_count(levels)) + off[count][None, :]).reshape(-1))
            cuts.append(sum(map(len, idx)))
        return _Plan(np.concatenate(idx), np.ascontiguousarray(np.concatenate(nbr).T), np.concatenate(row), tuple(cuts))

    def _plan(self, shape) -> _Plan:
        shape = tuple(int(v) for v in shape)
        if shape not in self._plans:
            if shape[0] != self.channels or len(_coding_steps(*shape[1:])) != self.steps:
                raise WrongShape(f"the context coder's tables are for {self.channels} channels in {self.steps} steps, "
                                 f"not symbols of shape {shape}")
            self._plans[shape] = self.plan(shape, self.levels)
        return self._plans[shape]

    @staticmethod
    def estimate(symbols: torch.Tensor, levels: int, prior: float = 0.5) -> torch.Tensor:
        """Tables from (N, c, H, W) training symbols: counts per (step, channel, context) + ``prior``, normalized."""
        s = symbols.to(torch.int64).numpy()
        n, c, h, w = s.shape
        p = ContextCoder.plan((c, h, w), levels)
        flat = np.concatenate([s.reshape(n, c, h * w), np.zeros((n, c, 1), np.int64)], 2).reshape(n, -1)
        rows = p.row[None, :] + flat[:, p.nbr].sum(1)
        steps = len(p.cuts)
        k = ContextCoder.context_count(levels)
        counts = np.bincount((rows * levels + flat[:, p.idx]).reshape(-1), minlength=steps * c * k * levels)
        counts = counts.reshape(steps, c, k, levels) + prior
        return torch.from_numpy(counts / counts.sum(3, keepdims=True))

    @staticmethod
    def _check_byte(sym: np.ndarray) -> int:
        import zlib

        return zlib.crc32(np.ascontiguousarray(sym, np.uint8).tobytes()) & 0xFF

    def encode(self, sym: np.ndarray) -> bytes:
        import constriction

        p = self._plan(sym.shape)
        c, h, w = sym.shape
        flat = np.zeros((c, h * w + 1), np.int32)
        flat[:, :-1] = sym.reshape(c, -1)
        flat = flat.reshape(-1)
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(flat.take(p.idx), constriction.stream.model.Categorical(perfect=False),
                   self.table.take(p.row + flat.take(p.nbr).sum(0), axis=0))
        enc.encode(self._check_byte(sym), constriction.stream.model.Uniform(256))
        words = enc.get_compressed()
        n = len(words)
        while n and words[n - 1] == 0:  # the decoder reads missing words as zeros: the canonical payload drops them
            n -= 1
        return words[:n].tobytes()

    def decode(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        import constriction

        p = self._plan(shape)
        c, h, w = shape
        if len(data) % 4:
            raise CorruptPayload(f"range-coded payload of {len(data)} bytes is not a whole number of 32-bit words")
        if data[-4:] == b"\0\0\0\0":
            raise CorruptPayload("range-coded payload ends with a zero word: not as encoded (padded)")
        dec = constriction.stream.queue.RangeDecoder(np.frombuffer(data, np.uint32).copy())
        model = constriction.stream.model.Categorical(perfect=False)
        flat = np.zeros(c * (h * w + 1), np.int32)
        start = 0
        try:
            for end in p.cuts:
                rows = p.row[start:end] + flat.take(p.nbr[:, start:end]).sum(0)
                flat[p.idx[start:end]] = dec.decode(model, self.table.take(rows, axis=0))
                start = end
            check = int(dec.decode(constriction.stream.model.Uniform(256)))
        except Exception as e:  # constriction raises plain errors on invalid data
            raise CorruptPayload(f"range-coded payload does not decode ({e})") from None
        sym = flat.reshape(c, h * w + 1)[:, :-1].reshape(c, h, w).astype(np.uint8)
        if check != self._check_byte(sym) or not dec.maybe_exhausted():
            raise CorruptPayload("range-coded payload fails its check (altered, truncated or padded)")
        return sym


class SerialContextCoder:
    """The first learned codecs' coder (codec format 1; checkpoints c10-r32-e20-b1-x20-bn*): one categorical model
    per channel and context (the symbol above, the symbol to the left; L where there is none), symbols coded in
    anti-diagonal order (y + x), channel-major within a diagonal, with float64 tables as stored. Encoding is one
    call over all diagonals (the same bytes as one call per diagonal); decoding one call per diagonal (31 for
    16 x 16), then re-encodes to check (a payload is exactly the coding of what it decodes to)."""

    FORMAT = 1

    def __init__(self, probs: torch.Tensor):
        self.probs = probs.detach().to(torch.float64).numpy()  # (c, (L+1)^2, L)
        self.levels = self.probs.shape[2]
        if self.probs.shape[1] != (self.levels + 1) ** 2 or not np.isfinite(self.probs).all() or (self.probs < 0).any():
            raise ConfigError(f"context coder tables have shape {self.probs.shape}: need (c, (L+1)^2, L), finite, >= 0")
        self.table = np.ascontiguousarray(self.probs.reshape(-1, self.levels))
        self._plans: dict = {}

    @staticmethod
    def estimate(symbols: torch.Tensor, levels: int, prior: float = 0.5) -> torch.Tensor:
        """Tables from (N, c, H, W) training symbols: counts per (channel, context) + ``prior``, normalized."""
        s = symbols.long()
        n, c, h, w = s.shape
        up = torch.full_like(s, levels)
        left = torch.full_like(s, levels)
        up[..., 1:, :] = s[..., :-1, :]
        left[..., :, 1:] = s[..., :, :-1]
        ctx = up * (levels + 1) + left
        idx = (torch.arange(c)[None, :, None, None] * (levels + 1) ** 2 + ctx) * levels + s
        counts = torch.bincount(idx.reshape(-1), minlength=c * (levels + 1) ** 2 * levels).double()
        counts = counts.reshape(c, (levels + 1) ** 2, levels) + prior
        return counts / counts.sum(2, keepdims=True)

    def _plan(self, shape):
        """Flat indices, in coding order, into the (c, h+1, w+1) map padded with L above and to the left: each
        symbol's own, the one above and the one to the left, its channel's first table row, and each diagonal's end."""
        shape = tuple(int(v) for v in shape)
        if shape not in self._plans:
            c, h, w = shape
            if c != self.probs.shape[0]:
                raise WrongShape(f"the context coder's tables are for {self.probs.shape[0]} channels, not {c}")
            own, up, left, row, cuts = [], [], [], [], []
            for d in range(h + w - 1):
                ys = np.arange(max(0, d - w + 1), min(h, d + 1))
                xs = d - ys
                base = np.arange(c)[:, None] * (h + 1) * (w + 1)
                own.append((base + (ys + 1) * (w + 1) + xs + 1).reshape(-1))
                up.append((base + ys * (w + 1) + xs + 1).reshape(-1))
                left.append((base + (ys + 1) * (w + 1) + xs).reshape(-1))
                row.append(np.repeat(np.arange(c) * (self.levels + 1) ** 2, len(ys)))
                cuts.append(sum(map(len, own)))
            self._plans[shape] = tuple(map(np.concatenate, (own, up, left, row))) + (tuple(cuts),)
        return self._plans[shape]

    def encode(self, sym: np.ndarray) -> bytes:
        import constriction

        own, up, left, row, _ = self._plan(sym.shape)
        c, h, w = sym.shape
        pad = np.full((c, h + 1, w + 1), self.levels, np.int64)
        pad[:, 1:, 1:] = sym
        pad = pad.reshape(-1)
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(pad.take(own).astype(np.int32), constriction.stream.model.Categorical(perfect=False),
                   self.table.take(row + pad.take(up) * (self.levels + 1) + pad.take(left), axis=0))
        return enc.get_compressed().tobytes()

    def decode(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        import constriction

        own, up, left, row, cuts = self._plan(shape)
        c, h, w = shape
        if len(data) % 4:
            raise CorruptPayload(f"range-coded payload of {len(data)} bytes is not a whole number of 32-bit words")
        dec = constriction.stream.queue.RangeDecoder(np.frombuffer(data, np.uint32).copy())
        model = constriction.stream.model.Categorical(perfect=False)
        pad = np.full(c * (h + 1) * (w + 1), self.levels, np.int64)
        start = 0
        for end in cuts:
            sl = slice(start, end)
            try:
                rows = row[sl] + pad.take(up[sl]) * (self.levels + 1) + pad.take(left[sl])
                pad[own[sl]] = dec.decode(model, self.table.take(rows, axis=0))
            except Exception as e:  # constriction raises plain errors on exhausted or invalid data
                raise CorruptPayload(f"range-coded payload does not decode ({e})") from None
            start = end
        sym = pad.reshape(c, h + 1, w + 1)[:, 1:, 1:].astype(np.uint8)
        if self.encode(sym) != bytes(data):  # coding is deterministic: anything else was altered or padded
            raise CorruptPayload("range-coded payload is not the coding of the symbols it decodes to")
        return sym


CODERS = {ContextCoder.FORMAT: ContextCoder, SerialContextCoder.FORMAT: SerialContextCoder}
CODEC_DIR = "codec"  # a checkpoint's own folder for a codec its unchanged cloud half reads (tune_cloud = false)


def codec_home(checkpoint) -> Path | None:
    """Where a checkpoint's learned codec files are: the checkpoint folder itself (a codec checkpoint, whose cloud
    half was trained behind the codec), its ``codec/`` folder (a codec added to a checkpoint whose cloud half is
    unchanged), or None."""
    d = Path(checkpoint)
    for home in (d, d / CODEC_DIR):
        if (home / CODEC_FILE).is_file():
            return home
    return None


class LearnedCodec(Codec):
    """The bottleneck of a checkpoint: edge-side reduction + quantizer, range-coded symbols, cloud-side expansion."""

    FORMAT = ContextCoder.FORMAT  # what write_learned_codec writes
    name = LEARNED

    def __init__(self, bottleneck, probs: torch.Tensor, digest: bytes, feature_shape: tuple[int, int, int],
                 fmt: int = FORMAT):
        self.bottleneck = bottleneck.eval()
        self.format = fmt
        self.coder = CODERS[fmt](probs)
        self.digest, self.feature_shape = digest, tuple(feature_shape)
        self._fast = _FastBottleneck(self.bottleneck)
        self._code_shape = (self.bottleneck.code_channels, *self.feature_shape[1:])
        self._levels = self.bottleneck.levels

    @classmethod
    def load(cls, checkpoint) -> LearnedCodec:
        from safetensors.torch import load_file

        from .bottleneck_net import Bottleneck

        d = codec_home(checkpoint)
        if d is None:
            raise ConfigError(f"{checkpoint} carries no learned codec ({CODEC_FILE}, {CODEC_TENSORS}, in the folder or "
                              f"in {CODEC_DIR}/): use a checkpoint trained with one (see docs/codecs.md) or another codec")
        if not (d / CODEC_TENSORS).is_file():
            raise ConfigError(f"{d} has {CODEC_FILE} but no {CODEC_TENSORS}: copy the codec's files together")
        raw_json, raw_t = (d / CODEC_FILE).read_bytes(), (d / CODEC_TENSORS).read_bytes()
        meta = json.loads(raw_json)
        if meta.get("format") not in CODERS:
            raise ConfigError(f"{d / CODEC_FILE}: codec format {meta.get('format')} is not supported "
                              f"(this version reads {', '.join(map(str, sorted(CODERS)))})")
        spec = meta["bottleneck"]
        b = Bottleneck(spec["channels"], spec["code_channels"], spec["bits"], spec.get("refine", False))
        t = load_file(str(d / CODEC_TENSORS))
        b.load_state_dict({k[len("bottleneck."):]: v for k, v in t.items() if k.startswith("bottleneck.")})
        digest = hashlib.sha256(raw_json + raw_t).digest()[:8]
        return cls(b, t["coder.probs"], digest, tuple(meta["feature_shape"]), meta["format"])

    def params(self) -> bytes:
        return struct.pack("<B8s", self.format, self.digest)

    def check_params(self, params: bytes) -> None:
        if len(params) != 9:
            raise CorruptPayload(f"bn codec parameters are 9 bytes, got {len(params)}")
        fmt, digest = struct.unpack("<B8s", params)
        if fmt != self.format:
            raise UnknownCodec(f"bn codec format {fmt} is not this side's ({self.format}): edge and cloud must use "
                               f"the codec files of the same checkpoint")
        if digest != self.digest:
            raise CodecMismatch(f"the frame's learned codec {digest.hex()} is not this side's {self.digest.hex()}: "
                                f"edge and cloud must use the codec files of the same checkpoint")

    def _check(self, shape):
        if tuple(shape[1:]) != self.feature_shape:
            raise WrongShape(f"the bn codec codes features of shape (R, {', '.join(map(str, self.feature_shape))}), "
                             f"got {tuple(shape)}")

    def encode(self, x):
        x = _check_batch(x, self.name)
        self._check(x.shape)
        sym = self._fast.symbols(x).numpy()
        return [self.coder.encode(s) for s in sym]

    def code_shape(self) -> tuple[int, int, int]:
        return self._code_shape

    def decode(self, payloads, shape):
        self._check(shape)
        sym = np.stack([self.coder.decode(p, self._code_shape) for p in payloads])
        if sym.max() >= self._levels:  # a format-2 coder cannot give more; a format-1 table could be larger
            raise CorruptPayload("decoded symbols out of range")
        return self._fast.from_symbols(torch.from_numpy(sym))

    def reference(self, x):
        with torch.no_grad():
            return self.bottleneck(_check_batch(x, self.name))

    def error_bound(self, x):
        return 1e-4 * (1 + self.reference(x).abs())

    def edge_macs(self, shape):
        return self.bottleneck.edge_macs(shape[1], shape[2])

    def cloud_macs(self, shape):
        return self.bottleneck.cloud_macs(shape[1], shape[2])

    def describe(self):
        return {"name": self.name, "lossless": False, **self.bottleneck.spec(), "digest": self.digest.hex(),
                "format": self.format}


class _FastBottleneck:
    """``Bottleneck.symbols`` / ``from_symbols`` for inference: the same operations in the same order (so the same
    symbols and values), called as functions on the weights taken once (no module dispatch), with the step computed
    once instead of per call."""

    def __init__(self, b):
        import torch.nn.functional as F

        self.F, self.refine, self.half = F, b.refine, b.levels // 2
        with torch.no_grad():
            self.step = b.log_step.detach().exp()[None, :, None, None]
            bn = b.bn
            self.bn = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            self.reduce, self.expand = b.reduce.weight.detach(), (b.expand.weight.detach(), b.expand.bias.detach())
            self.enc = (b.enc.weight.detach(), b.enc.bias.detach()) if b.refine else None
            self.dec = (b.dec.weight.detach(), b.dec.bias.detach()) if b.refine else None

    @torch.no_grad()
    def symbols(self, f: torch.Tensor) -> torch.Tensor:
        F = self.F
        if self.refine:
            f = f + F.conv2d(torch.relu(f), *self.enc, padding=1)
        mean, var, w, bias, eps = self.bn
        z = F.batch_norm(F.conv2d(f, self.reduce), mean, var, w, bias, False, 0.0, eps)
        t = (z / self.step - 0.5).clamp_(-self.half, self.half - 1)
        return (torch.round(t) + self.half).round_().to(torch.uint8)

    @torch.no_grad()
    def from_symbols(self, sym: torch.Tensor) -> torch.Tensor:
        F = self.F
        g = F.conv2d((sym.to(torch.float32) - self.half + 0.5) * self.step, *self.expand)
        return g + F.conv2d(torch.relu(g), *self.dec, padding=1) if self.refine else g


def write_learned_codec(directory, bottleneck, probs: torch.Tensor, feature_shape, extra: dict | None = None) -> None:
    """Write ``codec.json`` + ``codec.safetensors`` (the bottleneck's weights and the coder's tables, ``probs`` from
    ``ContextCoder.estimate``, stored as float16) into ``directory``: a checkpoint folder, or its ``codec/`` folder
    (``codec_home``), so that ``get("bn", checkpoint=...)`` loads them."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"bottleneck.{k}": v.detach().contiguous() for k, v in bottleneck.state_dict().items()}
    tensors["coder.probs"] = probs.detach().to(torch.float16).contiguous()
    save_file(tensors, str(d / CODEC_TENSORS))
    meta = {"format": ContextCoder.FORMAT, "name": LEARNED, "bottleneck": bottleneck.spec(),
            "feature_shape": list(feature_shape), "coder": "range coding, coarse to fine in 5 steps for 16 x 16 "
            "(codecs.ContextCoder): a table per (step, channel, context), context = how many of the 4 known "
            "neighbours exist and the sum of their symbols; a check byte last", **(extra or {})}
    (d / CODEC_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- registry
def get(name: str, checkpoint=None, calibration: torch.Tensor | None = None, clip_p: float = DEFAULT_CLIP_P) -> Codec:
    """The codec called ``name``. ``fp32``/``fp16``/``int8`` take ``+zstd``; ``q1``..``q4`` need
    ``calibration`` (validation features) for their clip ranges; ``bn`` needs the ``checkpoint`` that carries it."""
    base, _, extra = name.partition("+")
    if base in V1_NAMES and extra in ("", "zstd"):
        return V1Codec(base, extra == "zstd")
    if base in QUANT_NAMES and not extra:
        if calibration is None:
            raise ConfigError(f"codec {name} chooses its clip ranges on validation features: none were given")
        return ClippedUniform.calibrate(int(base[1]), calibration, clip_p)
    if base == LEARNED and not extra:
        if checkpoint is None:
            raise ConfigError("codec bn is the learned bottleneck of a checkpoint: give the checkpoint")
        return LearnedCodec.load(checkpoint)
    raise UnknownCodec(f"unknown codec {name!r}: use one of {', '.join(NAMES)} (fp32/fp16/int8 also with +zstd)")


def check_name(name: str) -> str:
    """``name`` if the registry knows it (without building the codec), else ``UnknownCodec``."""
    base, _, extra = name.partition("+")
    if (base in V1_NAMES and extra in ("", "zstd")) or (base in (*QUANT_NAMES, LEARNED) and not extra):
        return name
    raise UnknownCodec(f"unknown codec {name!r}: use one of {', '.join(NAMES)} (fp32/fp16/int8 also with +zstd)")


def required_codec(checkpoint) -> str | None:
    """``bn`` when the checkpoint is a codec checkpoint (its cloud half, trained behind the codec, reads only the
    codec's output); None for others, including those whose ``codec/`` folder adds a codec to an unchanged cloud."""
    return LEARNED if (Path(checkpoint) / CODEC_FILE).is_file() else None


def from_frame(name: str, params: bytes, held: dict | None = None) -> Codec:
    """Rebuild a named codec from a frame: q codecs from their parameters; ``bn`` is the receiver's own
    (``held[name]``), checked against the frame's digest."""
    if name in QUANT_NAMES:
        codec = ClippedUniform.from_params(params)
        if codec.name != name:
            raise CorruptPayload(f"frame names codec {name} but its parameters say {codec.name}")
        return codec
    if name == LEARNED:
        codec = (held or {}).get(name)
        if codec is None:
            raise UnknownCodec("the frame uses the learned codec bn, but this side's checkpoint carries none")
        codec.check_params(params)
        return codec
    raise UnknownCodec(f"unknown named codec {name!r} in frame: known {', '.join((*QUANT_NAMES, LEARNED))}")


class HeldCodecs(dict):
    """A receiver's checkpoint-bound codecs by name, and the registry's rebuilding of any frame's codec with them
    (``from_frame``): what ``wire.decode`` is given, so the wire format needs no import of this registry."""

    def from_frame(self, name: str, params: bytes) -> Codec:
        return from_frame(name, params, self)


def held_codecs(checkpoint) -> HeldCodecs:
    """The checkpoint-bound codecs a receiver can decode (the learned one, when the checkpoint carries one, in its
    folder or its ``codec/`` folder)."""
    return HeldCodecs({LEARNED: LearnedCodec.load(checkpoint)} if codec_home(checkpoint) is not None else {})


# ---------------------------------------------------------------------------------------------- evaluation
def frame(codec: Codec, x: torch.Tensor, fingerprint: str) -> bytes:
    """The wire frame an edge sends for the feature batch ``x`` with ``codec``."""
    from .runtime import wire

    if isinstance(codec, V1Codec):
        return wire.encode(x, fingerprint, codec.base, codec.compress)
    return wire.encode_named(x, fingerprint, codec)


@dataclass
class EdgePass:
    """The edge half's decisions on a split, and the features of the samples it offloads (computed once)."""

    predictions: torch.Tensor  # (N,) the last exit's answer
    decided_at: torch.Tensor  # (N,)
    remaining: torch.Tensor  # (R,) indices of the offloaded samples
    features: torch.Tensor  # (R, C, H, W)
    labels: torch.Tensor  # (N,)


@torch.no_grad()
def edge_pass(model, split, thresholds, temperatures=None, batch_size: int = 500, engine: str = "torch") -> EdgePass:
    from .engines import get_engine

    edge, _ = model.split()
    edge = get_engine(engine, edge.eval())  # the engine the run's own decisions came from (evaluate --engine)
    preds, decided, rem, feats = [], [], [], []
    for i in range(0, len(split), batch_size):
        r = edge.decide(split.images[i:i + batch_size], thresholds, temperatures)
        preds.append(r.predictions)
        decided.append(r.decided_at)
        rem.append(r.remaining + i)
        feats.append(r.features.contiguous())
    return EdgePass(torch.cat(preds), torch.cat(decided), torch.cat(rem), torch.cat(feats), split.labels.clone())


@torch.no_grad()
def apply_codec(model, ep: EdgePass, codec: Codec, checkpoint) -> dict:
    """The cloud's answers for the offloaded samples of ``ep`` after their features went through ``codec`` as
    one-sample wire frames, decoded by the receiver's side (its own copy of a learned codec, from ``checkpoint``).

    Returns accuracy, edge fraction, bytes per offloaded sample (whole frames) and per input, encode / decode
    time per offloaded sample (wall, and this thread's CPU time), the codec's MACs, and per-sample ``predictions``
    and ``payload_bytes``."""
    from .checkpoint import fingerprint as model_fingerprint
    from .runtime import wire

    fp = model_fingerprint(checkpoint)
    held = held_codecs(checkpoint)
    _, cloud = model.split()
    cloud.eval()
    shape = tuple(ep.features.shape[1:])
    n, off = len(ep.labels), len(ep.remaining)
    sizes = torch.zeros(n, dtype=torch.long)
    back = []
    t_enc = t_dec = c_enc = c_dec = 0.0
    for j in range(off):
        c0, t0 = time.thread_time(), time.perf_counter()
        body = frame(codec, ep.features[j:j + 1], fp)
        t1, c1 = time.perf_counter(), time.thread_time()
        back.append(wire.decode(body, fp, (1, *shape), codecs=held))
        t_dec += time.perf_counter() - t1
        c_dec += time.thread_time() - c1
        t_enc += t1 - t0
        c_enc += c1 - c0
        sizes[ep.remaining[j]] = len(body)
    preds = ep.predictions.clone()
    if off:
        x = torch.cat(back)
        preds[ep.remaining] = torch.cat([cloud(x[i:i + 500]).argmax(1) for i in range(0, off, 500)])
    return {"n": n, "accuracy": int((preds == ep.labels).sum()) / n, "edge_fraction": 1 - off / n,
            "payload_bytes_per_offloaded": int(sizes.sum()) / off if off else None,
            "payload_bytes_per_input": int(sizes.sum()) / n,
            "encode_ms_per_sample": 1000 * t_enc / max(off, 1), "decode_ms_per_sample": 1000 * t_dec / max(off, 1),
            "encode_cpu_ms_per_sample": 1000 * c_enc / max(off, 1), "decode_cpu_ms_per_sample": 1000 * c_dec / max(off, 1),
            "codec_edge_macs": codec.edge_macs(shape), "codec_cloud_macs": codec.cloud_macs(shape),
            "predictions": preds, "payload_bytes": sizes}


def calibration_features(model, val_split, thresholds, temperatures=None) -> torch.Tensor:
    """What a q codec chooses its clip ranges on: the edge features of the validation samples it would offload."""
    return edge_pass(model, val_split, thresholds, temperatures).features


def codec_summary(model, split, thresholds, temperatures, name: str, checkpoint, val_split=None,
                  engine: str = "torch") -> dict:
    """``hybridexit evaluate --codec NAME``: the conditional run with the codec applied to the offloaded features.
    Keys: codec, accuracy (with the codec), payload bytes per offloaded sample / per input, raw image bytes,
    encode / decode ms per sample, the codec's MACs; ``predictions`` and ``payload_bytes`` per sample."""
    from .links import RAW_IMAGE_BYTES

    calib = None
    if name in QUANT_NAMES:
        if val_split is None:
            raise ConfigError(f"codec {name} chooses its clip ranges on the validation split: it is needed")
        calib = calibration_features(model, val_split, thresholds, temperatures)
    r = evaluate_codec(model, split, thresholds, get(name, checkpoint=checkpoint, calibration=calib), checkpoint,
                       temperatures, engine=engine)
    return {"codec": name, "raw_image_bytes": RAW_IMAGE_BYTES, **{k: v for k, v in r.items() if k != "decided_at"}}


def evaluate_codec(model, split, thresholds, codec: Codec, checkpoint, temperatures=None, batch_size: int = 500,
                   engine: str = "torch") -> dict:
    """Conditional run of ``model`` on ``split`` with the offloaded features sent through ``codec``, the edge on
    ``engine``."""
    ep = edge_pass(model, split, thresholds, temperatures, batch_size, engine)
    return {**apply_codec(model, ep, codec, checkpoint), "decided_at": ep.decided_at}


wire.use_codec_registry(HeldCodecs())  # named frames decoded without a checkpoint's codecs (q1..q4)
