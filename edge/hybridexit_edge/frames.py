"""The edge's side of the wire format (docs/wire-format.md, the main package's ``runtime/wire.py``), without numpy:
version-1 frames of fp32 / fp16 / int8 features (payload built by the native library, zstd when the optional
``zstandard`` is installed) and the fp32 logits frame the cloud answers with. The frames are byte-identical to
``wire.encode``'s (tests/test_edge_package.py checks it)."""

from __future__ import annotations

import ctypes
import math
import struct
from array import array

from . import native
from .errors import HybridExitError

MAGIC, PROTOCOL_VERSION = b"HYBX", 1
CONTENT_TYPE = "application/x-hybridexit-tensor"
HEADER = struct.Struct("<4sHBB16sBBHI")  # magic, version, codec, flags, fingerprint, dtype, ndim, reserved, payload
FLAG_ZSTD, ZSTD_LEVEL = 0x01, 3
CODEC_IDS = {"fp32": (1, 1), "fp16": (2, 2), "int8": (3, 3)}  # codec -> (codec id, dtype id)


class WireError(HybridExitError, ValueError):
    """A frame that cannot be built or accepted."""


def encode(features, r: int, shape: tuple[int, int, int], fingerprint: str, codec: str = "fp32",
           compress: bool = False) -> bytes:
    """``r`` samples of channels-last float32 features (a C float array, (r, h, w, c)) as one (r, c, h, w) frame;
    ``shape`` is (c, h, w)."""
    if codec not in CODEC_IDS:
        raise WireError(f"codec {codec!r}: hybridexit-edge sends fp32, fp16 or int8 features")
    cid, did = CODEC_IDS[codec]
    c, h, w = shape
    so = native.lib()
    out = (ctypes.c_uint8 * so.hx_payload_bytes(r, h, w, c, cid))()
    native.call(so.hx_encode_features, features, r, h, w, c, cid, out)
    raw, flags = bytes(out), 0
    if compress:
        try:
            import zstandard
        except ImportError:
            raise WireError("--compress needs zstandard: pip install 'hybridexit-edge[zstd]'") from None
        raw = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(raw)
        flags |= FLAG_ZSTD
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, cid, flags, fingerprint.encode("ascii"), did, 4, 0, len(raw))
    return head + struct.pack("<4I", r, c, h, w) + raw


def decode_logits(body: bytes, fingerprint: str, n: int, classes: int) -> list[list[float]]:
    """The cloud's answer: an uncompressed fp32 (n, classes) frame of this model, as rows of floats."""
    if len(body) < HEADER.size + 8:
        raise WireError(f"answer of {len(body)} bytes is not a logits frame")
    magic, version, cid, flags, fp, did, ndim, reserved, nbytes = HEADER.unpack_from(body)
    shape = struct.unpack_from(f"<{ndim}I", body, HEADER.size) if ndim == 2 else ()
    if (magic, version, cid, flags, did, reserved) != (MAGIC, PROTOCOL_VERSION, 1, 0, 1, 0) or shape != (n, classes):
        raise WireError(f"answer is not an fp32 ({n}, {classes}) frame (codec {cid}, flags {flags}, shape {shape})")
    if fp.decode("ascii", "replace") != fingerprint:
        raise WireError(f"answer carries model fingerprint {fp!r}, this edge runs {fingerprint}")
    if nbytes != 4 * n * classes or len(body) != HEADER.size + 8 + nbytes:
        raise WireError("answer's payload length does not match its shape")
    v = array("f", body[HEADER.size + 8:])
    if not all(map(math.isfinite, v)):
        raise WireError("answer contains NaN or infinite logits")
    return [list(v[i * classes:(i + 1) * classes]) for i in range(n)]
