"""Reading without numpy: safetensors files (8-byte header length, JSON header, little-endian data) and the .npy
members of an .npz (``numpy.savez``), into bytes and C arrays. Every offset and size is checked."""

from __future__ import annotations

import ast
import ctypes
import json
import math
import struct
import zipfile

from .errors import CheckpointError, DatasetError

CTYPES = {"F32": ctypes.c_float, "U8": ctypes.c_uint8, "I32": ctypes.c_int32, "I64": ctypes.c_int64}


class Tensors:
    """The tensors of a safetensors file: ``shape(name)``, ``array(name)`` (a C array), ``raw(name)`` (bytes)."""

    def __init__(self, raw: bytes, source: str):
        try:
            (n,) = struct.unpack_from("<Q", raw)
            header = json.loads(bytes(raw[8:8 + n]))
        except (struct.error, ValueError) as e:
            raise CheckpointError(f"{source} is not a safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data, self.source, self.info = memoryview(raw)[8 + n:], source, header
        for name, t in header.items():
            b, e = t["data_offsets"]
            size = ctypes.sizeof(CTYPES[t["dtype"]]) if t["dtype"] in CTYPES else 0
            if not size or not 0 <= b <= e <= len(self.data) or e - b != size * math.prod(t["shape"]):
                raise CheckpointError(f"{source}: tensor {name} ({t['dtype']}, {t['shape']}) does not fit the file")

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info[name]["shape"])

    def raw(self, name: str) -> memoryview:
        if name not in self.info:
            raise CheckpointError(f"{self.source} lacks tensor {name}: export the checkpoint again")
        b, e = self.info[name]["data_offsets"]
        return self.data[b:e]

    def array(self, name: str) -> ctypes.Array:
        raw, t = self.raw(name), CTYPES[self.info[name]["dtype"]]
        return (t * (len(raw) // ctypes.sizeof(t))).from_buffer_copy(raw)


NPY_TYPES = {"|u1": ("B", 1), "<i8": ("q", 8), "<i4": ("i", 4), "|i1": ("b", 1)}


def read_npz(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """The arrays of an .npz (no pickles, C order, little endian): name -> (struct code, shape, raw bytes)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                data = z.read(member)
                if data[:6] != b"\x93NUMPY":
                    raise ValueError(f"{member} is not a .npy array")
                v1 = data[6] == 1
                hl, at = struct.unpack_from("<H" if v1 else "<I", data, 8)[0], 10 if v1 else 12
                h = ast.literal_eval(data[at:at + hl].decode("latin1"))
                if h.get("fortran_order") or h.get("descr") not in NPY_TYPES:
                    raise ValueError(f"{member}: dtype {h.get('descr')} / Fortran order not supported")
                code, size = NPY_TYPES[h["descr"]]
                shape = tuple(h["shape"])
                body = data[at + hl:]
                if len(body) != size * math.prod(shape):
                    raise ValueError(f"{member}: {len(body)} bytes for shape {shape}")
                out[member.removesuffix(".npy")] = (code, shape, body)
    except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, struct.error) as e:
        raise DatasetError(f"{path}: not a readable .npz of uint8 images ({e})") from None
    return out
