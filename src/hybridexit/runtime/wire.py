"""The binary wire format between the edge and the cloud: one tensor per HTTP body, never pickle, never JSON floats.

A frame is a fixed 32-byte little-endian header, the shape, then the payload (see docs/wire-format.md)::

    offset size  field
    0      4     magic            b"HYBX"
    4      2     version          uint16, PROTOCOL_VERSION
    6      1     codec            1 fp32, 2 fp16, 3 int8 (per-channel scale)
    7      1     flags            bit 0: payload is zstd-compressed; other bits must be 0
    8      16    fingerprint      ASCII hex of the model fingerprint (``checkpoint.fingerprint``)
    24     1     dtype            element type of the tensor data: 1 float32, 2 float16, 3 int8
    25     1     ndim             1..8
    26     2     boundary         uint16: 0 the checkpoint's edge/cloud boundary; b + 1: features before block b
    28     4     payload_bytes    uint32, length of what follows the shape (compressed length when zstd)
    32     4*ndim shape           uint32 per dimension, each >= 1
    ...    payload_bytes payload

Decoded payload: fp32 / fp16: the elements in C order. int8: one float32 scale per (dim 0, dim 1) pair, i.e.
per sample and channel, then the int8 elements in C order; value = scale * q, q in [-127, 127].

Named codecs (codec byte 4, dtype byte 4 "bytes", flags 0, shape (R, C, H, W); ``hybridexit.codecs``): after the
shape come the codec's name (uint8 length + ASCII), its parameters (uint16 length + bytes), R uint16 per-sample
payload lengths, then the R payloads; ``payload_bytes`` counts all of it. The codec decodes them to float32.

The boundary field says where the sender handed off (``HybridNet.split(at=b)``: the edge ran blocks 0..b-1 and
the exits among them): 0 in every frame of a sender that does not choose (and in the cloud's answers), b + 1 for
the features before block b, so 1 is the stem's output and the number of blocks + 1 the last block's output.

Parsing is strict: every field is checked, the body length must match exactly, a compressed payload may not
decompress past the size its shape implies, values must be finite. Each failure is a typed ``WireError`` with
the HTTP status a server should answer and a message that says what was wrong.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

import torch

from .. import codecs as codec_registry
from ..codecs.v1 import CODEC_DTYPE, ZSTD_LEVEL, V1Codec, decode_raw, encode_raw, quantize_int8  # noqa: F401 (quantize_int8: re-exported)
from ..codecs.v1 import decoded_bytes as v1_decoded_bytes
from ..errors import (  # noqa: F401 (the wire's errors, re-exported for its users)
    BadMagic,
    CodecMismatch,
    CorruptPayload,
    FingerprintMismatch,
    FrameTooLarge,
    TruncatedFrame,
    UnknownCodec,
    UnsupportedVersion,
    WireError,
    WrongDtype,
    WrongShape,
)

MAGIC = b"HYBX"
PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/x-hybridexit-tensor"
HEADER = struct.Struct("<4sHBB16sBBHI")
HEADER_BYTES = HEADER.size  # 32
MAX_NDIM = 8
FLAG_ZSTD = 0x01

CODECS = {"fp32": 1, "fp16": 2, "int8": 3}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
DTYPES = {"float32": 1, "float16": 2, "int8": 3}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
NAMED_CODEC_ID, BYTES_DTYPE_ID = 4, 4  # a codec named in the frame (hybridexit.codecs); opaque per-sample payloads
_NAME_RE = re.compile(rb"^[a-z0-9][a-z0-9+_-]{0,31}$")
_FP_RE = re.compile(rb"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class Header:
    version: int
    codec: str
    compressed: bool
    fingerprint: str
    dtype: str
    shape: tuple[int, ...]
    payload_bytes: int
    params: bytes = b""  # named codecs: the codec's parameters
    sample_bytes: tuple[int, ...] = ()  # named codecs: each sample's payload length
    boundary: int | None = None  # the block the features go into; None: the checkpoint's edge/cloud boundary

    @property
    def named(self) -> bool:
        return self.dtype == "bytes"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decoded_bytes(self) -> int:
        """Size of the decompressed payload this header implies (named codecs: the float32 tensor they give)."""
        return self.numel * 4 if self.named else v1_decoded_bytes(self.codec, self.shape)


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise UnknownCodec(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
    return codec


def _boundary_field(boundary: int | None) -> int:
    if boundary is None:
        return 0
    if not 0 <= int(boundary) < 0xFFFF:
        raise WireError(f"boundary {boundary}: a block index from 0 to {0xFFFF - 1}")
    return int(boundary) + 1


def _check_fingerprint(fingerprint: str) -> bytes:
    raw = fingerprint.encode("ascii", "replace")
    if not _FP_RE.match(raw):
        raise WireError(f"fingerprint {fingerprint!r} must be 16 lowercase hex digits (checkpoint.fingerprint)")
    return raw


# ---------------------------------------------------------------------------------------------- encoding
def encode_named(x: torch.Tensor, fingerprint: str, codec, boundary: int | None = None) -> bytes:
    """A (R, C, H, W) feature batch as a frame of a named codec (a ``hybridexit.codecs.registry.Codec``)."""
    fp = _check_fingerprint(fingerprint)
    name = codec.name.encode("ascii")
    if not _NAME_RE.match(name):
        raise UnknownCodec(f"codec name {codec.name!r} cannot go in a frame")
    payloads, params = codec.encode(x), codec.params()
    if max(len(p) for p in payloads) > 0xFFFF or len(params) > 0xFFFF:
        raise WireError("a named codec's per-sample payload and parameters must each fit in 65535 bytes")
    block = (struct.pack("<B", len(name)) + name + struct.pack("<H", len(params)) + params
             + struct.pack(f"<{len(payloads)}H", *map(len, payloads)) + b"".join(payloads))
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, NAMED_CODEC_ID, 0, fp, BYTES_DTYPE_ID, x.dim(),
                       _boundary_field(boundary), len(block))
    return head + struct.pack(f"<{x.dim()}I", *x.shape) + block


def encode(x: torch.Tensor, fingerprint: str, codec="fp32", compress: bool = False,
           level: int = ZSTD_LEVEL, boundary: int | None = None) -> bytes:
    """One tensor as a frame. ``codec`` fp32 / fp16 / int8 (``compress``: zstd the payload), or a named codec
    object (``hybridexit.codecs``; it does its own entropy coding, ``compress`` must be False). ``boundary``: the
    block the features go into when the sender hands off elsewhere than at the checkpoint's boundary."""
    if not isinstance(codec, str):
        if compress:
            raise WireError(f"codec {codec.name} codes its own payload: zstd compression does not apply")
        return encode_named(x, fingerprint, codec, boundary)
    check_codec(codec)
    fp = _check_fingerprint(fingerprint)
    if not isinstance(x, torch.Tensor) or not 1 <= x.dim() <= MAX_NDIM or x.numel() == 0:
        raise WrongShape(f"can only send a non-empty tensor with 1 to {MAX_NDIM} dimensions, "
                         f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    raw = encode_raw(x, codec, compress, level)
    flags = FLAG_ZSTD if compress else 0
    dtype = CODEC_DTYPE[codec]
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, CODECS[codec], flags, fp, DTYPES[dtype], x.dim(),
                       _boundary_field(boundary), len(raw))
    return head + struct.pack(f"<{x.dim()}I", *x.shape) + raw


# ---------------------------------------------------------------------------------------------- decoding
def parse_header(body: bytes) -> Header:
    """Check and read the header and shape; the payload length must match the body exactly."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise WireError(f"a frame is bytes, got {type(body).__name__}")
    if len(body) < HEADER_BYTES:
        if body[:4] != MAGIC[:len(body[:4])]:
            raise BadMagic(f"not a hybridexit tensor frame: it must start with {MAGIC!r} (got {bytes(body[:4])!r})")
        raise TruncatedFrame(f"frame truncated: {len(body)} bytes, the header alone is {HEADER_BYTES}")
    magic, version, codec_id, flags, fp, dtype_id, ndim, reserved, payload_bytes = HEADER.unpack_from(body)
    if magic != MAGIC:
        raise BadMagic(f"not a hybridexit tensor frame: it must start with {MAGIC!r} (got {magic!r})")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version} is not supported: this side speaks version "
                                 f"{PROTOCOL_VERSION}; run the same hybridexit version on edge and cloud")
    if codec_id == NAMED_CODEC_ID:
        return _parse_named(body, flags, fp, dtype_id, ndim, reserved, payload_bytes)
    if codec_id not in CODEC_NAMES:
        raise UnknownCodec(f"unknown codec id {codec_id}: known {', '.join(f'{v} {k}' for k, v in CODECS.items())}, "
                           f"{NAMED_CODEC_ID} named")
    codec = CODEC_NAMES[codec_id]
    if flags & ~FLAG_ZSTD:
        raise WireError(f"unknown flag bits 0x{flags & ~FLAG_ZSTD:02x}: only bit 0 (zstd) is defined")
    if not _FP_RE.match(fp):
        raise WireError("fingerprint field is not 16 lowercase hex digits")
    if dtype_id not in DTYPE_NAMES:
        raise WrongDtype(f"unknown dtype id {dtype_id}: known {', '.join(f'{v} {k}' for k, v in DTYPES.items())}")
    dtype = DTYPE_NAMES[dtype_id]
    if dtype != CODEC_DTYPE[codec]:
        raise WrongDtype(f"codec {codec} carries {CODEC_DTYPE[codec]} elements, the header says {dtype}")
    if not 1 <= ndim <= MAX_NDIM:
        raise WrongShape(f"ndim={ndim}: a frame carries a tensor with 1 to {MAX_NDIM} dimensions")
    end_shape = HEADER_BYTES + 4 * ndim
    if len(body) < end_shape:
        raise TruncatedFrame(f"frame truncated inside the shape: {len(body)} bytes, need {end_shape}")
    shape = struct.unpack_from(f"<{ndim}I", body, HEADER_BYTES)
    if min(shape) < 1:
        raise WrongShape(f"shape {shape} has an empty dimension")
    if codec == "int8" and ndim < 2:
        raise WrongShape(f"the int8 codec needs at least 2 dimensions (samples, channels, ...), got {shape}")
    have = len(body) - end_shape
    if have < payload_bytes:
        raise TruncatedFrame(f"frame truncated: header announces {payload_bytes} payload bytes, got {have}")
    if have > payload_bytes:
        raise CorruptPayload(f"{have - payload_bytes} unexpected bytes after the {payload_bytes}-byte payload")
    return Header(version, codec, bool(flags & FLAG_ZSTD), fp.decode(), dtype, tuple(shape), payload_bytes,
                  boundary=reserved - 1 if reserved else None)


def _parse_named(body, flags, fp, dtype_id, ndim, reserved, payload_bytes) -> Header:
    """Header of a named-codec frame: the codec block and the per-sample lengths are checked here too."""
    if flags:
        raise WireError(f"flags 0x{flags:02x}: a named codec codes its own payload, flags must be 0")
    if not _FP_RE.match(fp):
        raise WireError("fingerprint field is not 16 lowercase hex digits")
    if dtype_id != BYTES_DTYPE_ID:
        raise WrongDtype(f"a named codec carries bytes (dtype {BYTES_DTYPE_ID}), the header says {dtype_id}")
    if ndim != 4:
        raise WrongShape(f"a named codec carries a (R, C, H, W) feature batch, ndim={ndim}")
    end = HEADER_BYTES + 16
    if len(body) < end:
        raise TruncatedFrame(f"frame truncated inside the shape: {len(body)} bytes, need {end}")
    shape = struct.unpack_from("<4I", body, HEADER_BYTES)
    if min(shape) < 1:
        raise WrongShape(f"shape {shape} has an empty dimension")
    if len(body) - end < payload_bytes:
        raise TruncatedFrame(f"frame truncated: header announces {payload_bytes} payload bytes, got {len(body) - end}")
    if len(body) - end > payload_bytes:
        raise CorruptPayload(f"{len(body) - end - payload_bytes} unexpected bytes after the {payload_bytes}-byte payload")
    try:
        n = body[end]
        name = bytes(body[end + 1:end + 1 + n])
        (np_,) = struct.unpack_from("<H", body, end + 1 + n)
        at = end + 3 + n
        params = bytes(body[at:at + np_])
        lens = struct.unpack_from(f"<{shape[0]}H", body, at + np_)
    except (IndexError, struct.error):
        raise TruncatedFrame("frame truncated inside the named codec's block") from None
    if not _NAME_RE.match(name) or len(params) != np_:
        raise CorruptPayload("named codec block is malformed (name or parameters)")
    if at + np_ + 2 * shape[0] + sum(lens) != len(body):
        raise CorruptPayload(f"per-sample payload lengths add up to {sum(lens)}, the frame holds "
                             f"{len(body) - at - np_ - 2 * shape[0]}")
    return Header(PROTOCOL_VERSION, name.decode(), False, fp.decode(), "bytes", tuple(shape), payload_bytes,
                  params, tuple(lens), reserved - 1 if reserved else None)


def _decode_named(body, h: Header, codecs) -> torch.Tensor:
    codec = (codecs if codecs is not None else codec_registry.HeldCodecs()).from_frame(h.codec, h.params)
    start = len(body) - sum(h.sample_bytes)
    payloads = []
    for n in h.sample_bytes:
        payloads.append(bytes(body[start:start + n]))
        start += n
    x = codec.decode(payloads, h.shape)
    if tuple(x.shape) != h.shape or not torch.isfinite(x).all():
        raise CorruptPayload(f"codec {h.codec} decoded to a tensor that is not a finite {h.shape} batch")
    return x.to(torch.float32).contiguous()


def decode(body: bytes, fingerprint: str | None = None, shape: tuple | None = None,
           max_decoded_bytes: int | None = None, codecs: dict | None = None,
           require_codec: str | None = None) -> torch.Tensor:
    """A frame back to a float32 tensor, checking it against what the receiver expects.

    ``fingerprint``: the receiver's model fingerprint (mismatch -> ``FingerprintMismatch``). ``shape``: the
    expected shape, ``None`` entries matching any size (e.g. ``(None, 64, 8, 8)``). ``max_decoded_bytes``:
    refuse frames whose decompressed payload would be larger (``FrameTooLarge``). ``codecs``: the receiver's
    checkpoint-bound named codecs (``codecs.held_codecs``), for frames of a learned codec. ``require_codec``:
    refuse frames of any other codec (a cloud half trained behind a learned codec reads only its output).
    """
    h = parse_header(body)
    if require_codec is not None and h.codec != require_codec:
        raise CodecMismatch(f"this cloud half was trained behind the codec {require_codec!r}: frames with codec "
                            f"{h.codec!r} are refused (run the edge with --codec {require_codec})")
    if fingerprint is not None and h.fingerprint != fingerprint:
        raise FingerprintMismatch(
            f"model fingerprint {h.fingerprint} does not match this side's {fingerprint}: edge and cloud must "
            f"run the two halves of the same checkpoint (copy the checkpoint to both sides)")
    if shape is not None:
        ok = len(shape) == len(h.shape) and all(s is None or s == g for s, g in zip(shape, h.shape))
        if not ok:
            want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
            raise WrongShape(f"tensor of shape {h.shape} does not fit: this model expects {want}")
    expected = h.decoded_bytes
    if max_decoded_bytes is not None and expected > max_decoded_bytes:
        raise FrameTooLarge(f"tensor of shape {h.shape} decodes to {expected} bytes, over the limit of "
                            f"{max_decoded_bytes}: send fewer samples per request")
    if h.named:
        return _decode_named(body, h, codecs)
    return decode_raw(bytes(body[len(body) - h.payload_bytes:]), h.codec, h.shape, h.compressed)


def frame(codec, x: torch.Tensor, fingerprint: str) -> bytes:
    """The frame an edge sends for the feature batch ``x`` with a codec object of the registry
    (``hybridexit.codecs.get``): the original v1 frame for fp32 / fp16 / int8, a named-codec frame for the others."""
    if isinstance(codec, V1Codec):
        return encode(x, fingerprint, codec.base, codec.compress)
    return encode_named(x, fingerprint, codec)


def frame_bytes(shape: tuple[int, ...], codec: str) -> int:
    """Size of an uncompressed frame carrying a tensor of ``shape`` with ``codec``."""
    h = Header(PROTOCOL_VERSION, check_codec(codec), False, "0" * 16, CODEC_DTYPE[codec], tuple(shape), 0)
    return HEADER_BYTES + 4 * len(shape) + h.decoded_bytes
