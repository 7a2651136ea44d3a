"""Feature codecs for the edge -> cloud link, selectable by name: ``get(name, checkpoint=None, ...)``.

Every codec turns a (R, C, H, W) float feature batch into R per-sample byte strings (``encode``) and back
(``decode``), carries its parameters as bytes (``params``: what a frame needs besides the payloads) and states
its error bound (``reference`` is what a round trip must give back, ``error_bound`` how far from it each
element may be). The wire format (``runtime/wire.py``, docs/wire-format.md) carries the codec's name, its
parameters and the per-sample payloads; a receiver rebuilds the codec from them with ``from_frame``.

Registry (``CODEC_CHOICES``, every name ``get`` takes):

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

from pathlib import Path

import torch

from ..errors import ConfigError, CorruptPayload, UnknownCodec
from .base import Codec
from .clipped import ClippedUniform
from .learned import CODEC_FILE, LEARNED, LearnedCodec, codec_home
from .v1 import V1_NAMES, V1Codec

QUANT_NAMES = ("q1", "q2", "q3", "q4")
ZSTD = "+zstd"  # fp32 / fp16 / int8 with their payload zstd-compressed: the one spelling of that option
CODEC_CHOICES = (*V1_NAMES, *(n + ZSTD for n in V1_NAMES), *QUANT_NAMES, LEARNED)  # every name ``get`` takes: CLI choices
CODEC_HELP = ("feature codec on the wire (docs/codecs.md): fp32, fp16, int8 (+zstd: zstd the payload); q1-q4 choose "
        "their clip ranges on the validation split (needs the dataset); bn is the learned codec of a checkpoint "
        "that carries one")
DEFAULT_CLIP_P = 0.005  # q codecs: clip at the 0.5 % / 99.5 % quantiles (best of 0.5-5 % on validation, docs/codecs.md)


def _unknown(name: str) -> UnknownCodec:
    return UnknownCodec(f"unknown codec {name!r}: use one of {', '.join(CODEC_CHOICES)}")


def frame_codec(name: str) -> tuple[str, bool]:
    """(the codec a frame names, zstd on its payload) for a registry name: ``int8+zstd`` -> (``int8``, True)."""
    base = check_name(name).removesuffix(ZSTD)
    return base, base != name


def receivable(held=()) -> list[str]:
    """The codec names a receiver decodes (frames carry zstd as a flag, not a name): fp32 / fp16 / int8, q1..q4 and
    the checkpoint-bound codecs it ``held``."""
    return [*V1_NAMES, *QUANT_NAMES, *held]


def get(name: str, checkpoint=None, calibration: torch.Tensor | None = None, clip_p: float = DEFAULT_CLIP_P) -> Codec:
    """The codec called ``name``. ``fp32``/``fp16``/``int8`` take ``+zstd``; ``q1``..``q4`` need
    ``calibration`` (validation features) for their clip ranges; ``bn`` needs the ``checkpoint`` that carries it."""
    base, zstd = frame_codec(name)
    if base in V1_NAMES:
        return V1Codec(base, zstd)
    if base in QUANT_NAMES:
        if calibration is None:
            raise ConfigError(f"codec {name} chooses its clip ranges on validation features: none were given")
        return ClippedUniform.calibrate(int(base[1]), calibration, clip_p)
    if checkpoint is None:
        raise ConfigError("codec bn is the learned bottleneck of a checkpoint: give the checkpoint")
    return LearnedCodec.load(checkpoint)


def check_name(name: str) -> str:
    """``name`` if the registry knows it (without building the codec), else ``UnknownCodec``."""
    if name in CODEC_CHOICES:
        return name
    raise _unknown(name)


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
