"""An exported packed edge (``hybridexit export CKPT --format packed --out DIR``: ``edge.packed.safetensors`` and
``edge.json``) laid out for the native kernels and decided there in one call, without numpy.

The kernels' weight layouts are those of the main package's ``engines/packed.py`` (binary) and ``engines/kbit.py``
(k-bit), built by the library itself (``hx_binary_layout``, ``hx_kbit_layout``); BatchNorms are folded as
``engines/folding.py`` does (``hx_fold_bn``)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
from array import array
from dataclasses import dataclass
from pathlib import Path

from . import native
from .errors import CheckpointError, EngineError, InputShapeError
from .tensors import Tensors

MANIFEST = "edge.json"
MANIFEST_FORMAT = "hybridexit-edge-manifest-1"
NULL = native.F32P()


def _p(arr, kind=native.F32P):
    return ctypes.cast(arr, kind)


@dataclass
class EdgeResult:
    predictions: list[int]  # -1 where no exit was reached
    decided_at: list[int]  # exit k, or -1 (cloud)
    entropies: list[list[float]]  # per input, per exit; NaN where not reached
    features: ctypes.Array  # (R, H, W, C) float32, channels last, of the inputs that did not exit
    remaining: list[int]  # their indices


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
        self.t = Tensors(raw, str(art))
        self.so = native.lib()
        self.isa, self.kisa, self.bits = isa, kisa, m["bits"]
        self.fingerprint = m["fingerprint"]
        inp = m["input"]
        self.image_shape = (inp["channels"], inp["size"], inp["size"])
        self.feature_shape = tuple(m["feature_shape"])
        self._keep: list = []  # every C array the structures point into
        self._feats = (ctypes.c_float * 0)()
        blocks = (native.Block * len(m["blocks"]))()
        for i, spec in enumerate(m["blocks"]):
            b = blocks[i]
            b.cin, b.cout, b.stride, b.bits = spec["cin"], spec["cout"], spec["stride"], self.bits
            b.c1 = self._conv(f"blocks.{i}.c1", spec["cin"], spec["cout"])
            b.c2 = self._conv(f"blocks.{i}.c2", spec["cout"], spec["cout"])
        heads = (native.Head * len(m["exits"]))(*(self._head(spec) for spec in m["exits"]))
        exit_end = (ctypes.c_int32 * len(m["exits"]))(*(e["after_block"] for e in m["exits"]))
        stem = self._stem()
        mean, std = self._k(native.floats(inp["mean"])), self._k(native.floats(inp["std"]))
        self._keep += [blocks, heads, exit_end]
        self.edge = native.Edge(inp["channels"], inp["size"], inp["size"], _p(mean), _p(std), _p(stem),
                                self.t.shape("stem.weight")[0], len(m["blocks"]), blocks, len(m["exits"]),
                                _p(exit_end, native.I32P), heads)
        h, w, c = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        native.call(self.so.hx_edge_feature_shape, ctypes.byref(self.edge), ctypes.byref(h), ctypes.byref(w),
                    ctypes.byref(c))
        if (c.value, h.value, w.value) != self.feature_shape:
            raise CheckpointError(f"{mpath}: feature shape {self.feature_shape} does not match its blocks")

    def _k(self, arr):
        self._keep.append(arr)
        return arr

    def _f(self, name: str):
        return _p(self._k(self.t.array(name)))

    def _opt(self, name: str):
        return self._f(name) if name in self.t else NULL

    def _stem(self) -> ctypes.Array:
        """stem.weight (C0, C, 3, 3) as (3, 3, C, C0)."""
        c0, c = self.t.shape("stem.weight")[:2]
        w = array("f", bytes(self.t.raw("stem.weight")))
        out = (ctypes.c_float * len(w))()
        for o in range(c0):
            for i in range(c):
                for t in range(9):
                    out[(t * c + i) * c0 + o] = w[(o * c + i) * 9 + t]
        return self._k(out)

    def _conv(self, name: str, cin: int, cout: int) -> native.Conv:
        cv = native.Conv()
        cv.bn_a, cv.bn_b = self._f(f"{name}.bn_a"), self._f(f"{name}.bn_b")
        if self.bits == 1:
            colw, opad = (3 * cin + 63) // 64, (cout + 7) // 8 * 8
            wt, wpop = (ctypes.c_uint64 * (3 * colw * opad))(), (ctypes.c_int32 * (9 * cout))()
            bits = (ctypes.c_uint8 * len(self.t.raw(f"{name}.bits"))).from_buffer_copy(self.t.raw(f"{name}.bits"))
            native.call(self.so.hx_binary_layout, bits, cout, cin, wt, wpop)
            cv.thr = self._opt(f"{name}.shift")
            cv.scale = self._f(f"{name}.alpha")
            cv.rp_g, cv.rp_b, cv.rp_z = (self._opt(f"{name}.{k}") for k in ("rp_g", "rp_b", "rp_z"))
            cv.kw, cv.opad = 3 * colw, opad
        elif self.bits in (2, 4):
            z, g, opad = 2**self.bits - 1, (cin + 3) // 4, (cout + 15) // 16 * 16
            wt, wpop = (ctypes.c_int8 * (9 * g * opad * 4))(), (ctypes.c_int32 * opad)()
            levels = self.t.raw(f"{name}.levels")
            native.call(self.so.hx_kbit_layout, (ctypes.c_uint8 * len(levels)).from_buffer_copy(levels), cout, cin,
                        self.bits, wt, wpop)
            m = self.manifest
            cv.thr = self._opt(f"{name}.shift") if m["act_shift"] else NULL
            cv.scale = _p(self._k(native.floats(s / z**2 for s in array("f", bytes(self.t.raw(f"{name}.scale"))))))
            keys = ("rp_gamma", "rp_beta", "rp_zeta") if m["rprelu"] else ()
            cv.rp_g, cv.rp_b, cv.rp_z = (self._opt(f"{name}.{k}") for k in keys) if keys else (NULL,) * 3
        else:
            raise EngineError(f"the native kernels run 1, 2 and 4-bit edges, not {self.bits}-bit ones")
        cv.w = ctypes.cast(self._k(wt), ctypes.c_void_p)
        cv.wi = _p(self._k(wpop), native.I32P)
        return cv

    def _fold(self, prefix: str, eps: float):
        n = self.t.shape(f"{prefix}.weight")[0]
        a, b = self._k((ctypes.c_float * n)()), self._k((ctypes.c_float * n)())
        self.so.hx_fold_bn(*(self._f(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")),
                           eps, n, _p(a), _p(b))
        return _p(a), _p(b)

    def _head(self, spec: dict) -> native.Head:
        p, hd = spec["key"], native.Head()
        hd.bn_a, hd.bn_b = self._fold(f"{p}.bn", spec["bn_eps"])
        hd.pool, hd.hidden = spec["pool"], spec["hidden"]
        if spec["hidden"]:
            hd.w1 = self._f(f"{p}.hidden.0.weight")
            hd.h_a, hd.h_b = self._fold(f"{p}.hidden.1", spec["hidden_bn_eps"])
        hd.w2, hd.b2, hd.classes = self._f(f"{p}.fc.weight"), self._f(f"{p}.fc.bias"), self.t.shape(f"{p}.fc.bias")[0]
        return hd

    def decide(self, images, thresholds, temperatures=None) -> EdgeResult:
        """Algorithm 1 at the edge on uint8 images (N, C, H, W) in C order, given as any bytes-like object."""
        x = memoryview(images).cast("B")
        img = math.prod(self.image_shape)
        n, k = len(x) // img, len(self.manifest["exits"])
        if len(x) != n * img:
            raise InputShapeError(f"{len(x)} bytes are not whole uint8 images of shape {self.image_shape}")
        thr = native.floats(thresholds)
        temps = native.floats([1.0] * k if temperatures is None else temperatures)
        if len(thr) != k or len(temps) != k:
            raise InputShapeError(f"{len(thr)} thresholds and {len(temps)} temperatures for {k} exits: one each")
        size = math.prod(self.feature_shape)
        if len(self._feats) < n * size:  # the features of every input, at most: kept from call to call
            self._feats = (ctypes.c_float * (n * size))()
        preds, decided, rem = ((ctypes.c_int64 * n)() for _ in range(3))
        ents, r = (ctypes.c_float * (n * k))(), ctypes.c_int()
        native.call(self.so.hx_decide, ctypes.byref(self.edge), (ctypes.c_uint8 * len(x)).from_buffer_copy(x), 1, n,
                    thr, temps, self.isa, self.kisa, None, preds, decided, ents, self._feats, rem, ctypes.byref(r))
        feats = (ctypes.c_float * (r.value * size))()
        ctypes.memmove(feats, self._feats, ctypes.sizeof(feats))
        e = list(ents)
        return EdgeResult(list(preds), list(decided), [e[i * k:(i + 1) * k] for i in range(n)], feats,
                          list(rem)[: r.value])
