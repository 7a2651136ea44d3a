"""An exported packed edge (``hybridexit export CKPT --format packed --out DIR``: ``edge.packed.safetensors`` and
``edge.json``) loaded with numpy, laid out for the native kernels and decided there in one call.

The kernels' weight layouts are those of the main package's ``engines/packed.py`` (binary: sign bits as 64-bit
words per output channel, transposed) and ``engines/kbit.py`` (k-bit: int8 (9, G, opad, 4) and a bias); BatchNorms
are folded as PyTorch's CPU BatchNorm does (a = rsqrt(var + eps) * weight, b = bias - mean * a in float64)."""

from __future__ import annotations

import ctypes
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import native
from .errors import CheckpointError, EngineError, InputShapeError

MANIFEST = "edge.json"
MANIFEST_FORMAT = "hybridexit-edge-manifest-1"
ARTIFACT_FORMAT = "hybridexit-packed-1"
F32 = np.float32


def _c(a, dtype=F32) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)


def fold_bn(state: dict, prefix: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    a = (F32(1.0) / np.sqrt(state[f"{prefix}.running_var"].astype(F32) + F32(eps))) * state[f"{prefix}.weight"]
    b = state[f"{prefix}.bias"].astype(np.float64) - state[f"{prefix}.running_mean"].astype(np.float64) * a
    return _c(a), _c(b)


def binary_weights(bits: np.ndarray, o: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(wt (kw, opad) uint64, wpop (9, o) int32) from sign bits packed little-endian in (O, C, 3, 3) order."""
    signs = np.unpackbits(bits, count=o * c * 9, bitorder="little").reshape(o, c, 3, 3)
    colw, opad = (3 * c + 63) // 64, (o + 7) // 8 * 8
    lay = np.zeros((opad, 3, colw * 64), dtype=np.uint8)
    lay[:o, :, : 3 * c] = signs.transpose(0, 3, 2, 1).reshape(o, 3, 3 * c)  # (o, kx, ky * C + c)
    words = np.packbits(lay.reshape(opad, -1), axis=1, bitorder="little").view("<u8")
    wpop = signs.transpose(0, 2, 3, 1).reshape(o, 9, c).sum(2, dtype=np.int32).T
    return _c(words.T, np.uint64), _c(wpop, np.int32)


def kbit_weights(levels: np.ndarray, o: int, c: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(wk int8 (9, G, opad, 4), wbias int32 (opad)) from weight levels r packed ``bits`` each, w = 2r - Z."""
    z = 2**bits - 1
    n = o * c * 9
    planes = np.unpackbits(levels, count=n * bits, bitorder="little").reshape(n, bits).astype(np.int64)
    w = (2 * (planes << np.arange(bits)).sum(1) - z).reshape(o, c, 3, 3)
    g, opad = (c + 3) // 4, (o + 15) // 16 * 16
    wk = np.zeros((9, g * 4, opad), dtype=np.int8)
    wk[:, :c, :o] = w.transpose(2, 3, 1, 0).reshape(9, c, o)
    wbias = np.zeros(opad, dtype=np.int32)
    wbias[:o] = -z * w.sum(axis=(1, 2, 3))
    return _c(wk.reshape(9, g, 4, opad).transpose(0, 1, 3, 2), np.int8), wbias


@dataclass
class EdgeResult:
    predictions: np.ndarray  # (N,) int64, -1 where no exit was reached
    decided_at: np.ndarray  # (N,) int64: exit k, or -1 (cloud)
    entropies: np.ndarray  # (N, K) float32, NaN where not reached
    features: np.ndarray  # (R, C, H, W) float32 of the samples that did not exit
    remaining: np.ndarray  # (R,) int64


class PackedEdge:
    """The edge half of an exported checkpoint on the native kernels: ``decide(images, thresholds)``."""

    name = "packed"

    def __init__(self, folder, isa: int = -1, kisa: int = -1):
        folder = Path(folder)
        mpath = folder / MANIFEST
        if not mpath.is_file():
            raise CheckpointError(f"{folder} has no {MANIFEST}: export the checkpoint with `hybridexit export CKPT "
                                  f"--format packed --out DIR` and copy the whole folder")
        try:
            self.manifest = m = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{mpath} is not readable JSON ({e})") from None
        if m.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{mpath} is not a {MANIFEST_FORMAT} manifest (format {m.get('format')!r})")
        art = folder / m["artifact"]
        raw = art.read_bytes() if art.is_file() else b""
        if hashlib.sha256(raw).hexdigest() != m["artifact_sha256"]:
            raise CheckpointError(f"{art} is missing or is not the artifact {mpath} was written for (SHA-256 differs): "
                                  "copy both files of one export")
        from safetensors.numpy import load

        self.state = state = load(raw)
        self.isa, self.kisa = isa, kisa
        self.bits = m["bits"]
        self.fingerprint = m["fingerprint"]
        inp = m["input"]
        self.image_shape = (inp["channels"], inp["size"], inp["size"])
        self.feature_shape = tuple(m["feature_shape"])
        self._keep: list[np.ndarray] = []  # every array the C structures point into
        stem = self._k(state["stem.weight"].transpose(2, 3, 1, 0))  # (3, 3, C, C0)
        blocks = (native.Block * len(m["blocks"]))()
        for i, spec in enumerate(m["blocks"]):
            b = blocks[i]
            b.cin, b.cout, b.stride, b.bits = spec["cin"], spec["cout"], spec["stride"], self.bits
            b.c1 = self._conv(f"blocks.{i}.c1", spec["cin"], spec["cout"])
            b.c2 = self._conv(f"blocks.{i}.c2", spec["cout"], spec["cout"])
        heads = (native.Head * len(m["exits"]))()
        for k, spec in enumerate(m["exits"]):
            heads[k] = self._head(spec)
        exit_end = self._k([e["after_block"] for e in m["exits"]], np.int32)
        self._blocks, self._heads = blocks, heads
        self.edge = native.Edge(inp["channels"], inp["size"], inp["size"], native.ptr(self._k(inp["mean"])),
                                native.ptr(self._k(inp["std"])), native.ptr(stem), stem.shape[3], len(m["blocks"]),
                                blocks, len(m["exits"]), native.ptr(exit_end, native._i32p), heads)
        h, w, c = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        so = native.lib()
        native.call(so.hx_edge_feature_shape, ctypes.byref(self.edge), ctypes.byref(h), ctypes.byref(w), ctypes.byref(c))
        if (c.value, h.value, w.value) != self.feature_shape:
            raise CheckpointError(f"{mpath}: feature shape {self.feature_shape} does not match its blocks")

    def _k(self, a, dtype=F32) -> np.ndarray:
        a = _c(a, dtype)
        self._keep.append(a)
        return a

    def _opt(self, key):
        return native.ptr(self._k(self.state[key])) if key in self.state else native._f32p()

    def _conv(self, name: str, cin: int, cout: int) -> native.Conv:
        s, cv = self.state, native.Conv()
        cv.bn_a, cv.bn_b = native.ptr(self._k(s[f"{name}.bn_a"])), native.ptr(self._k(s[f"{name}.bn_b"]))
        if self.bits == 1:
            wt, wpop = binary_weights(s[f"{name}.bits"], cout, cin)
            cv.thr = self._opt(f"{name}.shift")
            cv.scale = native.ptr(self._k(s[f"{name}.alpha"]))
            cv.rp_g, cv.rp_b, cv.rp_z = (self._opt(f"{name}.{k}") for k in ("rp_g", "rp_b", "rp_z"))
            cv.kw, cv.opad = wt.shape
        elif self.bits in (2, 4):
            z = 2**self.bits - 1
            wt, wpop = kbit_weights(s[f"{name}.levels"], cout, cin, self.bits)
            cv.thr = self._opt(f"{name}.shift") if self.manifest["act_shift"] else native._f32p()
            cv.scale = native.ptr(self._k((s[f"{name}.scale"].astype(np.float64) / z**2).astype(F32)))
            keys = ("rp_gamma", "rp_beta", "rp_zeta") if self.manifest["rprelu"] else ()
            cv.rp_g, cv.rp_b, cv.rp_z = (self._opt(f"{name}.{k}") for k in keys) if keys else (native._f32p(),) * 3
        else:
            raise EngineError(f"the native kernels run 1, 2 and 4-bit edges, not {self.bits}-bit ones")
        cv.w = self._k(wt, wt.dtype).ctypes.data
        cv.wi = native.ptr(self._k(wpop, np.int32), native._i32p)
        return cv

    def _head(self, spec: dict) -> native.Head:
        s, p, hd = self.state, spec["key"], native.Head()
        a, b = fold_bn(s, f"{p}.bn", spec["bn_eps"])
        hd.bn_a, hd.bn_b = native.ptr(self._k(a)), native.ptr(self._k(b))
        hd.pool, hd.hidden = spec["pool"], spec["hidden"]
        if spec["hidden"]:
            ha, hb = fold_bn(s, f"{p}.hidden.1", spec["hidden_bn_eps"])
            hd.w1 = native.ptr(self._k(s[f"{p}.hidden.0.weight"]))
            hd.h_a, hd.h_b = native.ptr(self._k(ha)), native.ptr(self._k(hb))
        fc_w, fc_b = self._k(s[f"{p}.fc.weight"]), self._k(s[f"{p}.fc.bias"])
        hd.w2, hd.b2, hd.classes = native.ptr(fc_w), native.ptr(fc_b), fc_b.size
        return hd

    def decide(self, images: np.ndarray, thresholds, temperatures=None) -> EdgeResult:
        """Algorithm 1 at the edge on uint8 images (N, C, H, W) (or float in [0, 1]); features are channels first."""
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[1:] != self.image_shape:
            raise InputShapeError(f"expected images of shape (N, {', '.join(map(str, self.image_shape))}), "
                                  f"got {tuple(x.shape)}")
        x = _c(x, np.uint8 if x.dtype == np.uint8 else F32)
        n, k = x.shape[0], len(self.manifest["exits"])
        thr = _c(thresholds)
        temps = _c([1.0] * k if temperatures is None else temperatures)
        if thr.size != k or temps.size != k:
            raise InputShapeError(f"{thr.size} thresholds and {temps.size} temperatures for {k} exits: one each")
        c, h, w = self.feature_shape
        preds, decided, rem = (np.empty(n, np.int64) for _ in range(3))
        ents = np.empty((n, k), F32)
        feats = np.empty((n, h, w, c), F32)
        r = ctypes.c_int()
        native.call(native.lib().hx_decide, ctypes.byref(self.edge), x.ctypes.data, int(x.dtype == np.uint8), n,
                    native.ptr(thr), native.ptr(temps), self.isa, self.kisa, None, native.ptr(preds, native._i64p),
                    native.ptr(decided, native._i64p), native.ptr(ents), native.ptr(feats),
                    native.ptr(rem, native._i64p), ctypes.byref(r))
        return EdgeResult(preds, decided, ents, feats[: r.value].transpose(0, 3, 1, 2), rem[: r.value])
