"""Builds the native edge library (the main package's torch-free kernel core, ``csrc/`` -> ``libhx_edge.so``) with
the C++ compiler (``$CXX``, default c++) and tags the wheel py3-none-<platform>: the library has no Python ABI (it
is loaded with ctypes). Cross builds: CXX=aarch64-linux-gnu-g++ HX_EDGE_PLAT_NAME=linux_aarch64 (scripts/
build_edge_aarch64.sh)."""

import os
import shlex
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
SOURCES = ["bconv.cpp", "kbit.cpp", "decide.cpp", "layout.cpp"]  # engines/native.py CORE_SOURCES
CFLAGS = ["-O3", "-ffp-contract=off", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden"]


class BuildLib(build_ext):
    def run(self):
        cxx = shlex.split(os.environ.get("CXX", "c++"))
        out = Path(self.build_lib) / "hybridexit_edge" / "libhx_edge.so"
        if self.inplace:
            out = HERE / "hybridexit_edge" / "libhx_edge.so"
        out.parent.mkdir(parents=True, exist_ok=True)
        ldflags = shlex.split(os.environ.get("HX_EDGE_LDFLAGS", ""))  # e.g. -static-libstdc++ for a portable wheel
        cmd = [*cxx, *CFLAGS, *(str(CSRC / s) for s in SOURCES), *ldflags, "-o", str(out)]
        print(" ".join(cmd))
        subprocess.check_call(cmd)

    def get_outputs(self):
        return [str(Path(self.build_lib) / "hybridexit_edge" / "libhx_edge.so")]


class Wheel(bdist_wheel):
    def finalize_options(self):
        if os.environ.get("HX_EDGE_PLAT_NAME"):
            self.plat_name = os.environ["HX_EDGE_PLAT_NAME"]
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(ext_modules=[Extension("hybridexit_edge.libhx_edge", sources=[])], cmdclass={"build_ext": BuildLib, "bdist_wheel": Wheel})
