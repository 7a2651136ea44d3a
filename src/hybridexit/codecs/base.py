"""The codec interface: per-sample payloads, parameters as bytes, a stated error bound."""

from __future__ import annotations

import io

import torch

from ..errors import CorruptPayload, WrongShape, need

NAMED_ZSTD_LEVEL = 19  # the named codecs' payloads (q1..q4); v1 frames use v1.ZSTD_LEVEL


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


def check_batch(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.numel() == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise WrongShape(f"{what} encodes a non-empty (R, C, H, W) feature batch, got {got}")
    return x.detach().to("cpu", torch.float32).contiguous()


def zstd(data: bytes) -> bytes:
    zstandard = need("zstandard", "zstd compression")

    return zstandard.ZstdCompressor(level=NAMED_ZSTD_LEVEL, write_content_size=True).compress(data)


def unzstd(data: bytes, expected: int) -> bytes:
    out = decompress(data, expected)
    if len(out) != expected:
        raise CorruptPayload(f"payload decompresses to {len(out)} bytes, the shape implies {expected}")
    return out


def decompress(data: bytes, expected: int) -> bytes:
    """zstd bytes back, never more than ``expected`` (+1 to detect a frame that claims less than it holds)."""
    zstandard = need("zstandard", "zstd compression")

    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise CorruptPayload(f"payload is flagged zstd but is not a zstd frame ({e})") from None
    if size not in (-1, expected):  # -1: size not recorded in the frame
        raise CorruptPayload(f"zstd frame says {size} decompressed bytes, the shape implies {expected}")
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
            out = r.read(expected + 1)  # never more than the shape allows, whatever the frame claims
    except zstandard.ZstdError as e:
        raise CorruptPayload(f"zstd payload does not decompress ({e})") from None
    return out
