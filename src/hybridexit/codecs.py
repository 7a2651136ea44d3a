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
- ``bn``: the learned bottleneck of a checkpoint that carries one (``codec.json`` + ``codec.safetensors``,
  see ``bottleneck.py``): the edge sends c x H x W symbols of ``bits`` bits, coded by a range coder
  (``constriction``) whose per-channel model is conditioned on the symbols above and to the left (tables
  estimated on the training split). The frame carries a digest of the codec's files, so a cloud with other
  weights refuses it. Bound: the round trip equals the bottleneck's own float output (``Bottleneck.forward``
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
class ContextCoder:
    """Range coding (``constriction``) of (c, H, W) symbols in [0, L) with one categorical model per channel and
    context (the symbol above, the symbol to the left; L where there is none). Symbols are coded in
    anti-diagonal order (y + x), so the decoder needs one call per diagonal, vectorized over the rest."""

    def __init__(self, probs: torch.Tensor):
        self.probs = probs.detach().to(torch.float64).numpy()  # (c, (L+1)^2, L)
        self.levels = self.probs.shape[2]
        if self.probs.shape[1] != (self.levels + 1) ** 2 or not np.isfinite(self.probs).all() or (self.probs < 0).any():
            raise ConfigError(f"context coder tables have shape {self.probs.shape}: need (c, (L+1)^2, L), finite, >= 0")

    @staticmethod
    def estimate(symbols: torch.Tensor, levels: int, prior: float = 0.5) -> torch.Tensor:
        """Tables from (N, c, H, W) training symbols: counts per (channel, context) + ``prior``, normalized."""
        s = symbols.long()
        n, c, h, w = s.shape
        ctx = ContextCoder._contexts(s, levels)
        idx = (torch.arange(c)[None, :, None, None] * (levels + 1) ** 2 + ctx) * levels + s
        counts = torch.bincount(idx.reshape(-1), minlength=c * (levels + 1) ** 2 * levels).double()
        counts = counts.reshape(c, (levels + 1) ** 2, levels) + prior
        return counts / counts.sum(2, keepdim=True)

    @staticmethod
    def _contexts(s: torch.Tensor, levels: int) -> torch.Tensor:
        up = torch.full_like(s, levels)
        left = torch.full_like(s, levels)
        up[..., 1:, :] = s[..., :-1, :]
        left[..., :, 1:] = s[..., :, :-1]
        return up * (levels + 1) + left

    @staticmethod
    def _order(h: int, w: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(np.arange(max(0, d - w + 1), min(h, d + 1)), d - np.arange(max(0, d - w + 1), min(h, d + 1)))
                for d in range(h + w - 1)]

    def encode(self, sym: np.ndarray) -> bytes:
        import constriction

        c, h, w = sym.shape
        ctx = self._contexts(torch.from_numpy(sym.astype(np.int64)), self.levels).numpy()
        enc = constriction.stream.queue.RangeEncoder()
        model = constriction.stream.model.Categorical(perfect=False)
        ch = np.arange(c)
        for ys, xs in self._order(h, w):
            s = sym[:, ys, xs].reshape(-1).astype(np.int32)  # channel-major within the diagonal
            p = self.probs[ch[:, None], ctx[:, ys, xs]].reshape(-1, self.levels)
            enc.encode(s, model, p)
        return enc.get_compressed().tobytes()

    def decode(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        import constriction

        c, h, w = shape
        if len(data) % 4:
            raise CorruptPayload(f"range-coded payload of {len(data)} bytes is not a whole number of 32-bit words")
        dec = constriction.stream.queue.RangeDecoder(np.frombuffer(data, np.uint32).copy())
        model = constriction.stream.model.Categorical(perfect=False)
        out = np.full((c, h + 1, w + 1), self.levels, np.int64)  # padded: row 0 / column 0 are "none"
        ch = np.arange(c)
        for ys, xs in self._order(h, w):
            ctx = out[:, ys, xs + 1] * (self.levels + 1) + out[:, ys + 1, xs]  # up, left in padded coordinates
            p = self.probs[ch[:, None], ctx].reshape(-1, self.levels)
            try:
                s = dec.decode(model, p)
            except Exception as e:  # constriction raises plain errors on exhausted or invalid data
                raise CorruptPayload(f"range-coded payload does not decode ({e})") from None
            out[:, ys + 1, xs + 1] = np.asarray(s).reshape(c, len(ys))
        sym = out[:, 1:, 1:].astype(np.uint8)
        if self.encode(sym) != bytes(data):  # coding is deterministic: anything else was altered or padded
            raise CorruptPayload("range-coded payload is not the coding of the symbols it decodes to")
        return sym


class LearnedCodec(Codec):
    """The bottleneck of a checkpoint: edge-side reduction + quantizer, range-coded symbols, cloud-side expansion."""

    FORMAT = 1
    name = LEARNED

    def __init__(self, bottleneck, probs: torch.Tensor, digest: bytes, feature_shape: tuple[int, int, int]):
        self.bottleneck = bottleneck.eval()
        self.coder = ContextCoder(probs)
        self.digest, self.feature_shape = digest, tuple(feature_shape)

    @classmethod
    def load(cls, checkpoint) -> LearnedCodec:
        from safetensors.torch import load_file

        from .bottleneck import Bottleneck

        d = Path(checkpoint)
        if not (d / CODEC_FILE).is_file() or not (d / CODEC_TENSORS).is_file():
            raise ConfigError(f"{d} carries no learned codec ({CODEC_FILE}, {CODEC_TENSORS}): use a checkpoint "
                              f"trained with one (see docs/codecs.md) or another codec")
        raw_json, raw_t = (d / CODEC_FILE).read_bytes(), (d / CODEC_TENSORS).read_bytes()
        meta = json.loads(raw_json)
        if meta.get("format") != cls.FORMAT:
            raise ConfigError(f"{d / CODEC_FILE}: codec format {meta.get('format')} is not supported")
        spec = meta["bottleneck"]
        b = Bottleneck(spec["channels"], spec["code_channels"], spec["bits"], spec.get("refine", False))
        t = load_file(str(d / CODEC_TENSORS))
        b.load_state_dict({k[len("bottleneck."):]: v for k, v in t.items() if k.startswith("bottleneck.")})
        digest = hashlib.sha256(raw_json + raw_t).digest()[:8]
        return cls(b, t["coder.probs"], digest, tuple(meta["feature_shape"]))

    def params(self) -> bytes:
        return struct.pack("<B8s", self.FORMAT, self.digest)

    def check_params(self, params: bytes) -> None:
        if len(params) != 9:
            raise CorruptPayload(f"bn codec parameters are 9 bytes, got {len(params)}")
        fmt, digest = struct.unpack("<B8s", params)
        if fmt != self.FORMAT:
            raise UnknownCodec(f"bn codec format {fmt} is not supported (this side: {self.FORMAT})")
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
        sym = self.bottleneck.symbols(x).numpy()
        return [self.coder.encode(s) for s in sym]

    def code_shape(self) -> tuple[int, int, int]:
        b = self.bottleneck
        return (b.code_channels, *self.feature_shape[1:])

    def decode(self, payloads, shape):
        self._check(shape)
        sym = np.stack([self.coder.decode(p, self.code_shape()) for p in payloads])
        if (sym >= self.bottleneck.levels).any():
            raise CorruptPayload("decoded symbols out of range")
        return self.bottleneck.from_symbols(torch.from_numpy(sym))

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
        return {"name": self.name, "lossless": False, **self.bottleneck.spec(), "digest": self.digest.hex()}


def write_learned_codec(directory, bottleneck, probs: torch.Tensor, feature_shape, extra: dict | None = None) -> None:
    """Write ``codec.json`` + ``codec.safetensors`` (the bottleneck's weights and the coder's tables) into a
    checkpoint directory, so that ``get("bn", checkpoint=directory)`` loads them."""
    from safetensors.torch import save_file

    d = Path(directory)
    tensors = {f"bottleneck.{k}": v.detach().contiguous() for k, v in bottleneck.state_dict().items()}
    tensors["coder.probs"] = probs.detach().to(torch.float64).contiguous()
    save_file(tensors, str(d / CODEC_TENSORS))
    meta = {"format": LearnedCodec.FORMAT, "name": LEARNED, "bottleneck": bottleneck.spec(),
            "feature_shape": list(feature_shape), "coder": "range coding, per-channel model given the symbols above "
            "and to the left", **(extra or {})}
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
    """``bn`` when the checkpoint carries a learned codec (its cloud half reads only the codec's output)."""
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


def held_codecs(checkpoint) -> dict:
    """The checkpoint-bound codecs a receiver can decode (the learned one, when the checkpoint has it)."""
    d = Path(checkpoint)
    return {LEARNED: LearnedCodec.load(d)} if (d / CODEC_FILE).is_file() else {}


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
def edge_pass(model, split, thresholds, temperatures=None, batch_size: int = 500) -> EdgePass:
    edge, _ = model.split()
    edge.eval()
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
    time per offloaded sample, the codec's MACs, and per-sample ``predictions`` and ``payload_bytes``."""
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
    t_enc = t_dec = 0.0
    for j in range(off):
        t0 = time.perf_counter()
        body = frame(codec, ep.features[j:j + 1], fp)
        t1 = time.perf_counter()
        back.append(wire.decode(body, fp, (1, *shape), codecs=held))
        t_dec += time.perf_counter() - t1
        t_enc += t1 - t0
        sizes[ep.remaining[j]] = len(body)
    preds = ep.predictions.clone()
    if off:
        x = torch.cat(back)
        preds[ep.remaining] = torch.cat([cloud(x[i:i + 500]).argmax(1) for i in range(0, off, 500)])
    return {"n": n, "accuracy": int((preds == ep.labels).sum()) / n, "edge_fraction": 1 - off / n,
            "payload_bytes_per_offloaded": int(sizes.sum()) / off if off else None,
            "payload_bytes_per_input": int(sizes.sum()) / n,
            "encode_ms_per_sample": 1000 * t_enc / max(off, 1), "decode_ms_per_sample": 1000 * t_dec / max(off, 1),
            "codec_edge_macs": codec.edge_macs(shape), "codec_cloud_macs": codec.cloud_macs(shape),
            "predictions": preds, "payload_bytes": sizes}


def calibration_features(model, val_split, thresholds, temperatures=None) -> torch.Tensor:
    """What a q codec chooses its clip ranges on: the edge features of the validation samples it would offload."""
    return edge_pass(model, val_split, thresholds, temperatures).features


def codec_summary(model, split, thresholds, temperatures, name: str, checkpoint, val_split=None) -> dict:
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
                       temperatures)
    return {"codec": name, "raw_image_bytes": RAW_IMAGE_BYTES, **{k: v for k, v in r.items() if k != "decided_at"}}


def evaluate_codec(model, split, thresholds, codec: Codec, checkpoint, temperatures=None, batch_size: int = 500) -> dict:
    """Conditional run of ``model`` on ``split`` with the offloaded features sent through ``codec``."""
    ep = edge_pass(model, split, thresholds, temperatures, batch_size)
    return {**apply_codec(model, ep, codec, checkpoint), "decided_at": ep.decided_at}
