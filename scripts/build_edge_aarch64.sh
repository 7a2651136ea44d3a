#!/usr/bin/env bash
# The hybridexit-edge wheel for aarch64 (Raspberry Pi 4/5, Jetson, ARM servers), cross-compiled here:
#   scripts/build_edge_aarch64.sh [OUT_DIR]      (default edge/dist/aarch64)
# Needs Debian's g++-aarch64-linux-gnu (scripts/edge_arm_check.sh installs it where missing). libstdc++ and libgcc
# are linked into libhx_edge.so, so the wheel needs only glibc (2.36 here: Debian 12 / Raspberry Pi OS bookworm and
# later). Install on the device with: pip install hybridexit_edge-*-py3-none-linux_aarch64.whl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-edge/dist/aarch64}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
rm -rf edge/build/lib edge/build/bdist.* edge/build/temp.*
CXX="aarch64-linux-gnu-g++" HX_EDGE_LDFLAGS="-static-libstdc++ -static-libgcc" HX_EDGE_PLAT_NAME=linux_aarch64 \
  "$PY" -m pip wheel -q --no-deps --no-build-isolation ./edge -w "$OUT"
rm -rf edge/build/lib edge/build/bdist.* edge/build/temp.*
ls "$OUT"/hybridexit_edge-*-linux_aarch64.whl
