"""The edge's side of the wire format (docs/wire-format.md, the main package's ``runtime/wire.py``), on numpy:
version-1 frames of fp32 / fp16 / int8 features (zstd when the optional ``zstandard`` is installed) and the fp32
logits frame the cloud answers with. The frames are byte-identical to ``wire.encode``'s (tests/test_edge_package.py
checks it)."""

from __future__ import annotations

import struct

import numpy as np

from .errors import HybridExitError

MAGIC, PROTOCOL_VERSION = b"HYBX", 1
CONTENT_TYPE = "application/x-hybridexit-tensor"
HEADER = struct.Struct("<4sHBB16sBBHI")  # magic, version, codec, flags, fingerprint, dtype, ndim, reserved, payload
FLAG_ZSTD, ZSTD_LEVEL = 0x01, 3
CODEC_IDS = {"fp32": (1, 1), "fp16": (2, 2), "int8": (3, 3)}  # codec -> (codec id, dtype id)


class WireError(HybridExitError, ValueError):
    """A frame that cannot be built or accepted."""


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per (sample, channel): scale = max|x| / 127, q = round(x / scale)."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    scale = (np.abs(flat).max(axis=2) / np.float32(127.0)).astype("<f4")
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(flat / safe[:, :, None]), -127, 127).astype(np.int8)
    return scale, q.reshape(x.shape)


def encode(x: np.ndarray, fingerprint: str, codec: str = "fp32", compress: bool = False) -> bytes:
    """A float32 feature batch as one frame."""
    if codec not in CODEC_IDS:
        raise WireError(f"codec {codec!r}: hybridexit-edge sends fp32, fp16 or int8 features")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if codec == "fp32":
        raw = x.astype("<f4", copy=False).tobytes()
    elif codec == "fp16":
        raw = x.astype("<f2").tobytes()
    else:
        scale, q = quantize_int8(x)
        raw = scale.tobytes() + q.tobytes()
    flags = 0
    if compress:
        try:
            import zstandard
        except ImportError:
            raise WireError("--compress needs zstandard: pip install 'hybridexit-edge[zstd]'") from None
        raw = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(raw)
        flags |= FLAG_ZSTD
    cid, did = CODEC_IDS[codec]
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, cid, flags, fingerprint.encode("ascii"), did, x.ndim, 0, len(raw))
    return head + struct.pack(f"<{x.ndim}I", *x.shape) + raw


def decode_logits(body: bytes, fingerprint: str, n: int, classes: int) -> np.ndarray:
    """The cloud's answer: an uncompressed fp32 (n, classes) frame of this model."""
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
    out = np.frombuffer(body, dtype="<f4", offset=HEADER.size + 8).reshape(n, classes)
    if not np.isfinite(out).all():
        raise WireError("answer contains NaN or infinite logits")
    return out
