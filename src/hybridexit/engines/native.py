"""Build and load the packed engine's C++ kernels (``csrc/``) on first use, cached per source and torch version.

The kernels are a torch-free core with a C ABI (``csrc/hx_edge.h``) and a thin torch binding (``torch_binding.cpp``);
the hybridexit-edge package (``edge/``) builds the same core into a shared library without torch.

``torch.utils.cpp_extension.load`` compiles with the g++ and the torch already installed (no isolated build
environment, so no second torch is pulled); the build directory is ``$HYBRIDEXIT_BUILD_DIR`` or
``~/.cache/hybridexit/ext/<hash>``, where the hash covers the sources, the compile flags and the torch version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

from ..errors import EngineError

CSRC = Path(__file__).parent / "csrc"
# the torch-free core (C ABI: csrc/hx_edge.h, also built by the hybridexit-edge package in edge/) and its binding
CORE_SOURCES = ("bconv.cpp", "kbit.cpp", "decide.cpp", "layout.cpp")
SOURCES = (*CORE_SOURCES, "torch_binding.cpp")
CFLAGS = ["-O3", "-ffp-contract=off", "-std=c++17"]


def _build_dir() -> Path:
    h = hashlib.sha256(torch.__version__.encode() + " ".join(CFLAGS).encode())
    for f in sorted(CSRC.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    root = os.environ.get("HYBRIDEXIT_BUILD_DIR") or Path.home() / ".cache" / "hybridexit" / "ext"
    d = Path(root) / h.hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.cache
def kernels():
    """The compiled extension module (``sign_pack``, ``conv_int``, ``run_blocks``, ``best_isa``, ``isa_name``)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise EngineError(f"the packed engine needs a C++ compiler to build its kernels once: {cxx!r} was not found "
                          "(install g++, or use --engine torch)")
    if shutil.which("ninja") is None:  # the PyPI ninja (packed extra) sits beside this interpreter
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        if shutil.which("ninja") is None:
            raise EngineError("the packed engine builds its kernels with ninja: pip install 'hybridexit[packed]' "
                              "(or use --engine torch)")
    from filelock import FileLock
    from torch.utils.cpp_extension import load

    build = _build_dir()
    try:
        # torch's own build lock is a plain file that a killed build leaves behind, and every later load then
        # waits on it forever; an OS lock (released when its process ends, killed or not) serializes the builds
        # here instead, so a torch lock found while holding it is stale
        with FileLock(build / "build.lock"):
            (build / "lock").unlink(missing_ok=True)
            return load(name="hybridexit_bconv", sources=[str(CSRC / f) for f in SOURCES],
                        extra_cflags=CFLAGS, build_directory=str(build), verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        raise EngineError(f"building the packed engine's kernels failed: {str(e).splitlines()[0]}") from None
