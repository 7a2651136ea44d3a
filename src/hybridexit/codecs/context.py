"""The learned codec's entropy coders: range coding of the bottleneck's symbols with a context model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, CorruptPayload, WrongShape, need


def coding_steps(h: int, w: int) -> list[tuple[np.ndarray, np.ndarray]]:
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
    """Range coding (``constriction``) of (c, H, W) symbols in [0, L), coarse to fine (``coding_steps``): a symbol's
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
        steps = coding_steps(h, w)
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
            if shape[0] != self.channels or len(coding_steps(*shape[1:])) != self.steps:
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
        constriction = need("constriction", "the learned codec (bn)")

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
        constriction = need("constriction", "the learned codec (bn)")

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
        constriction = need("constriction", "the learned codec (bn)")

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
        constriction = need("constriction", "the learned codec (bn)")

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
