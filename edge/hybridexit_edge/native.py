"""The native edge library (``libhx_edge.so``: the kernels' torch-free core, C ABI ``csrc/hx_edge.h``) through ctypes.

The library is built when the package is installed (``setup.py``); ``HX_EDGE_LIB`` points at another build (the
aarch64 one under qemu, say)."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from .errors import EngineError

ABI_VERSION = 1
_f32p, _i32p, _i64p = (ctypes.POINTER(t) for t in (ctypes.c_float, ctypes.c_int32, ctypes.c_int64))


class Conv(ctypes.Structure):
    _fields_ = [("bn_a", _f32p), ("bn_b", _f32p), ("thr", _f32p), ("w", ctypes.c_void_p), ("wi", _i32p),
                ("scale", _f32p), ("rp_g", _f32p), ("rp_b", _f32p), ("rp_z", _f32p), ("kw", ctypes.c_int),
                ("opad", ctypes.c_int)]


class Block(ctypes.Structure):
    _fields_ = [("cin", ctypes.c_int), ("cout", ctypes.c_int), ("stride", ctypes.c_int), ("bits", ctypes.c_int),
                ("c1", Conv), ("c2", Conv)]


class Head(ctypes.Structure):
    _fields_ = [("bn_a", _f32p), ("bn_b", _f32p), ("pool", ctypes.c_int), ("hidden", ctypes.c_int), ("w1", _f32p),
                ("h_a", _f32p), ("h_b", _f32p), ("w2", _f32p), ("b2", _f32p), ("classes", ctypes.c_int)]


class Edge(ctypes.Structure):
    _fields_ = [("c", ctypes.c_int), ("h", ctypes.c_int), ("w", ctypes.c_int), ("mean", _f32p), ("std", _f32p),
                ("stem", _f32p), ("c0", ctypes.c_int), ("n_blocks", ctypes.c_int), ("blocks", ctypes.POINTER(Block)),
                ("n_exits", ctypes.c_int), ("exit_end", _i32p), ("heads", ctypes.POINTER(Head))]


def ptr(a: np.ndarray | None, kind=_f32p):
    """A C pointer to a contiguous array (kept alive by the caller), or NULL."""
    if a is None:
        return kind()
    assert a.flags.c_contiguous
    return a.ctypes.data_as(kind)


def library_path() -> Path:
    return Path(os.environ.get("HX_EDGE_LIB") or Path(__file__).with_name("libhx_edge.so"))


@functools.cache
def lib() -> ctypes.CDLL:
    path = library_path()
    if not path.exists():
        raise EngineError(f"the native edge library {path} is missing: reinstall hybridexit-edge (pip builds it)")
    try:
        so = ctypes.CDLL(str(path))
    except OSError as e:
        raise EngineError(f"cannot load the native edge library {path} ({e})") from None
    if so.hx_abi_version() != ABI_VERSION:
        raise EngineError(f"{path} speaks ABI {so.hx_abi_version()}, this package {ABI_VERSION}: reinstall it")
    for name in ("hx_arch", "hx_isa_name", "hx_kbit_isa_name"):
        getattr(so, name).restype = ctypes.c_char_p
    so.hx_decide.argtypes = [ctypes.POINTER(Edge), ctypes.c_void_p, ctypes.c_int, ctypes.c_int, _f32p, _f32p,
                             ctypes.c_int, ctypes.c_int, ctypes.c_void_p, _i64p, _i64p, _f32p, _f32p, _i64p,
                             ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_size_t]
    so.hx_edge_feature_shape.argtypes = [ctypes.POINTER(Edge), *[ctypes.POINTER(ctypes.c_int)] * 3, ctypes.c_char_p,
                                         ctypes.c_size_t]
    return so


def call(fn, *args) -> None:
    """A C ABI call that reports failure through its error buffer (the last two arguments)."""
    err = ctypes.create_string_buffer(512)
    if fn(*args, err, len(err)) != 0:
        raise EngineError(f"native edge library: {err.value.decode(errors='replace')}")


def isa_names() -> tuple[str, str]:
    """The levels this CPU runs: (binary blocks and float parts, k-bit blocks)."""
    so = lib()
    return so.hx_isa_name(so.hx_best_isa()).decode(), so.hx_kbit_isa_name(so.hx_kbit_best_isa()).decode()
