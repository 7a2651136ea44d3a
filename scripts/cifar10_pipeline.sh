#!/usr/bin/env bash
# The CIFAR-10 ResNet-32 training chain behind results/cifar10.json (CPU budget schedule).
# Every step is resumable: re-running the script continues where it stopped.
#   1. FP32 baseline                       checkpoints/c10-r32-fp32          (18 epochs)
#   2. 20E+10C binary, exit at 20, joint   checkpoints/c10-r32-e20-b1-x20    (init: 1; EPOCHS_20E epochs)
#   3. 16E+14C binary, exit at 16, joint   checkpoints/c10-r32-e16-b1-x16-joint     (init: 1; EPOCHS_16E)
#   4. 16E+14C binary, exit at 16, separate checkpoints/c10-r32-e16-b1-x16-separate (init: 1; EPOCHS_16E + 1 exit epoch)
set -euo pipefail
cd "$(dirname "$0")/.."
HX=".venv/bin/hybridexit"
DATA="${DATA:-data}"
EPOCHS_20E="${EPOCHS_20E:-8}"
EPOCHS_16E="${EPOCHS_16E:-2}"

run() {  # run OUT ARGS...: train into OUT, resuming if it exists
  local out=$1; shift
  local resume=""
  [ -f "$out/config.json" ] && resume="--resume"
  echo "== $(date -u +%H:%M:%S) $out"
  $HX train --data-dir "$DATA" --out "$out" "$@" $resume
}

run checkpoints/c10-r32-fp32 --epochs 18 --batch-size 128 --lr 0.1
run checkpoints/c10-r32-e20-b1-x20 --edge-layers 20 --edge-bits 1 --exits 20 --init checkpoints/c10-r32-fp32 \
    --epochs "$EPOCHS_20E" --lr 0.05
run checkpoints/c10-r32-e16-b1-x16-joint --edge-layers 16 --edge-bits 1 --exits 16 --init checkpoints/c10-r32-fp32 \
    --epochs "$EPOCHS_16E" --lr 0.05
run checkpoints/c10-r32-e16-b1-x16-separate --edge-layers 16 --edge-bits 1 --exits 16 --init checkpoints/c10-r32-fp32 \
    --mode separate --epochs "$EPOCHS_16E" --exit-epochs 1 --lr 0.05
echo "== $(date -u +%H:%M:%S) done"
