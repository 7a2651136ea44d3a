"""Feature codecs for the edge -> cloud link and what they cost: the codec interface and registry (``get``,
``CODEC_CHOICES``, ``from_frame``), the protocol's fp32 / fp16 / int8, the clipped uniform q1..q4, the learned bottleneck
(its network, context-model range coder and files) and the radio energy of the bytes on a link (``links``).

May import: errors, model.
"""

from .base import Codec
from .clipped import ClippedUniform
from .context import CODERS, ContextCoder, SerialContextCoder
from .learned import CODEC_DIR, CODEC_FILE, CODEC_TENSORS, LEARNED, LearnedCodec, codec_home, write_learned_codec
from .registry import (
    CODEC_CHOICES,
    CODEC_HELP,
    DEFAULT_CLIP_P,
    QUANT_NAMES,
    V1_NAMES,
    ZSTD,
    HeldCodecs,
    check_name,
    frame_codec,
    from_frame,
    get,
    held_codecs,
    receivable,
    required_codec,
)
from .v1 import V1Codec

__all__ = ["CODEC_CHOICES", "CODEC_HELP", "CODEC_DIR", "CODEC_FILE", "CODEC_TENSORS", "CODERS", "DEFAULT_CLIP_P", "LEARNED",
           "QUANT_NAMES", "V1_NAMES", "ZSTD", "ClippedUniform", "Codec", "ContextCoder", "HeldCodecs", "LearnedCodec",
           "SerialContextCoder", "V1Codec", "check_name", "codec_home", "frame_codec", "from_frame", "get",
           "held_codecs", "receivable", "required_codec", "write_learned_codec"]
