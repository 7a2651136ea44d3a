"""The native edge library (``libhx_edge.so``: the kernels' torch-free core, C ABI ``csrc/hx_edge.h``) through ctypes.

The library is built when the package is installed (``setup.py``); ``HX_EDGE_LIB`` points at another build."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from .errors import EngineError

ABI_VERSION = 2
c_int, c_size_t, c_char_p, c_void_p = ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p
F32P, I32P, I64P = (ctypes.POINTER(t) for t in (ctypes.c_float, ctypes.c_int32, ctypes.c_int64))


class Conv(ctypes.Structure):
    _fields_ = [("bn_a", F32P), ("bn_b", F32P), ("thr", F32P), ("w", c_void_p), ("wi", I32P), ("scale", F32P),
                ("rp_g", F32P), ("rp_b", F32P), ("rp_z", F32P), ("kw", c_int), ("opad", c_int)]


class Block(ctypes.Structure):
    _fields_ = [("cin", c_int), ("cout", c_int), ("stride", c_int), ("bits", c_int), ("c1", Conv), ("c2", Conv)]


class Head(ctypes.Structure):
    _fields_ = [("bn_a", F32P), ("bn_b", F32P), ("pool", c_int), ("hidden", c_int), ("w1", F32P), ("h_a", F32P),
                ("h_b", F32P), ("w2", F32P), ("b2", F32P), ("classes", c_int)]


class Edge(ctypes.Structure):
    _fields_ = [("c", c_int), ("h", c_int), ("w", c_int), ("mean", F32P), ("std", F32P), ("stem", F32P),
                ("c0", c_int), ("n_blocks", c_int), ("blocks", ctypes.POINTER(Block)), ("n_exits", c_int),
                ("exit_end", I32P), ("heads", ctypes.POINTER(Head))]


def floats(values) -> ctypes.Array:
    """A float32 C array of ``values`` (rounded to float32 as numpy's astype would)."""
    values = list(values)
    return (ctypes.c_float * len(values))(*values)


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
        getattr(so, name).restype = c_char_p
    so.hx_payload_bytes.restype = c_size_t
    so.hx_payload_bytes.argtypes = [c_int] * 5
    so.hx_fold_bn.argtypes = [F32P, F32P, F32P, F32P, ctypes.c_float, c_int, F32P, F32P]
    so.hx_decide.argtypes = [ctypes.POINTER(Edge), c_void_p, c_int, c_int, F32P, F32P, c_int, c_int, c_void_p, I64P,
                             I64P, F32P, F32P, I64P, ctypes.POINTER(c_int), c_char_p, c_size_t]
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
