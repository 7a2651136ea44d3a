"""``bn``: the learned bottleneck of a checkpoint, its files, and its fast inference path."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import CodecMismatch, ConfigError, CorruptPayload, UnknownCodec, WrongShape
from .base import Codec, check_batch
from .context import CODERS, ContextCoder

LEARNED = "bn"
CODEC_FILE, CODEC_TENSORS = "codec.json", "codec.safetensors"

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
        x = check_batch(x, self.name)
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
            return self.bottleneck(check_batch(x, self.name))

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
