#!/usr/bin/env bash
# The aarch64 build of the native edge library passes the kernel equality test under qemu-user:
#   1. hx_selftest (edge/selftest, C ABI only) on this x86-64 machine writes the reference outputs;
#   2. the aarch64 wheel is cross-compiled (scripts/build_edge_aarch64.sh) and its libhx_edge.so is linked into the
#      aarch64 hx_selftest;
#   3. qemu-aarch64 runs it on an emulated CPU with NEON and dotprod, and on a Cortex-A72 (NEON, no dotprod: the
#      run-time selection picks the other k-bit kernels); every ISA level must give the x86 integers exactly,
#      floats within 1e-4 and the same decisions.
# Correctness only: qemu says nothing about speed on real ARM hardware. Installs the cross tools with apt-get where
# missing (root, or sudo without a password); skips with a visible message where it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
CSRC=src/hybridexit/engines/csrc
WORK=${WORK:-edge/build/arm-check}
QEMU=$(command -v qemu-aarch64 || command -v qemu-aarch64-static || true)
if ! command -v aarch64-linux-gnu-g++ >/dev/null || [ -z "$QEMU" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "edge ARM check: installing g++-aarch64-linux-gnu and qemu-user (apt-get)"
  if ! { $SUDO apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1 ||
         { $SUDO apt-get update -q >/dev/null 2>&1 &&
           $SUDO apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1; }; }; then
    echo "SKIPPED edge ARM check: cannot install g++-aarch64-linux-gnu and qemu-user here (no apt-get, root or network)"
    exit 0
  fi
  QEMU=$(command -v qemu-aarch64 || command -v qemu-aarch64-static)
fi
mkdir -p "$WORK"
g++ -O2 -ffp-contract=off -std=c++17 -I"$CSRC" edge/selftest/hx_selftest.cpp "$CSRC"/bconv.cpp "$CSRC"/kbit.cpp "$CSRC"/layout.cpp \
  "$CSRC"/decide.cpp -o "$WORK/selftest-x86_64"
"$WORK/selftest-x86_64" --write "$WORK/reference.bin"
WHEEL=$(scripts/build_edge_aarch64.sh "$WORK/wheel" | tail -1)
rm -rf "$WORK/lib" && mkdir -p "$WORK/lib"
"${PY:-.venv/bin/python}" -m zipfile -e "$WHEEL" "$WORK/lib" 2>/dev/null || python3 -m zipfile -e "$WHEEL" "$WORK/lib"
aarch64-linux-gnu-g++ -O2 -ffp-contract=off -std=c++17 -I"$CSRC" edge/selftest/hx_selftest.cpp -L"$WORK/lib/hybridexit_edge" -lhx_edge \
  -o "$WORK/selftest-aarch64"
for cpu in max cortex-a72; do
  echo "== qemu-aarch64 -cpu $cpu, $(basename "$WHEEL")"
  "$QEMU" -cpu "$cpu" -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH="$WORK/lib/hybridexit_edge" \
    "$WORK/selftest-aarch64" --check "$WORK/reference.bin" | grep -v '^ok '
done
