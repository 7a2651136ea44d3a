#!/usr/bin/env python3
"""Why a binary hybrid's validation figures differ between a GPU and this CPU: TF32 or ordinary rounding?

PyTorch runs CUDA convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32``: 10 mantissa bits for the
operands, FP32 accumulation). A binary edge turns tiny changes of a pre-activation into sign flips, so a network
evaluated on a GPU may exit and classify differently from the same network on a CPU. This emulates TF32 on the CPU
(every conv and linear operand rounded to 10 mantissa bits, round to nearest) and, as a control, perturbs the same
operands by FP32-sized noise (relative 1e-7, what another summation order gives), on each checkpoint's validation
split at its calibrated thresholds, and sets beside them what the GPU measured for the same checkpoint (its last
training-log validation figure; for sweep points, the calibration record of its row). Writes results/tf32.json.

    python benchmarks/tf32.py --data-dir data [--checkpoints checkpoints/A checkpoints/B]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from hybridexit.calibration.stats import collect_exit_stats
from hybridexit.data import load_cifar
from hybridexit.model.checkpoint import load_model, split_of

DEFAULT = ["runs/checkpoints/c10-r32-e20-b1-x20-joint-k3", "checkpoints/c10-r32-e20-b1-x20"]


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """FP32 values rounded to TF32's 10 explicit mantissa bits (to nearest), kept in FP32 storage."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _perturbed(op, transform):
    def run(x, weight, *args, **kwargs):
        return op(transform(x), transform(weight), *args, **kwargs)
    return run


@contextlib.contextmanager
def operands(transform):
    """Every F.conv2d / F.linear (nn.Conv2d, the quantized convs, nn.Linear) gets transformed operands."""
    if transform is None:
        yield
        return
    with mock.patch.object(F, "conv2d", _perturbed(F.conv2d, transform)), \
            mock.patch.object(F, "linear", _perturbed(F.linear, transform)):
        yield


def fp32_noise(seed: int = 0, rel: float = 1e-7):
    g = torch.Generator().manual_seed(seed)
    return lambda t: t * (1 + rel * torch.randn(t.shape, generator=g))


def measure(model, val, thresholds, transform) -> dict:
    with operands(transform):
        st = collect_exit_stats(model, val)
    preds, decided = st.simulate(thresholds)
    return {"accuracy": round(st.accuracy(preds), 4),
            "exit_fraction": [round(float((decided == j).float().mean()), 4) for j in range(len(thresholds))],
            "final_accuracy": round(st.cloud_accuracy, 4),
            "exit_accuracy": [round(st.accuracy(st.exit_preds[:, j]), 4) for j in range(len(thresholds))]}


def gpu_record(ckpt: str) -> dict:
    """What the GPU measured for this checkpoint: its log's last validation figures, and a sweep row's calibration."""
    out = {}
    log = Path(ckpt) / "log.jsonl"
    meta = json.loads((Path(ckpt) / "config.json").read_text())
    if log.exists():
        last = [json.loads(line) for line in log.read_text().splitlines() if line.strip()][-1]
        out["training_log_last_epoch"] = {"epoch": last["epoch"], "val_acc (exits, final)": last["val_acc"],
                                          "device": meta.get("device")}
    for store in Path("results").glob("sweep-*.json"):
        for row in json.loads(store.read_text()):
            evaluated_on = row.get("eval_device") or row.get("device") or ""  # rows before eval_device: = training's
            if row.get("checkpoint") == ckpt and row.get("point") == "calibrated" and evaluated_on.startswith("cuda"):
                cal = row["calibration"]
                out["sweep_calibration"] = {k: cal[k] for k in ("accuracy", "exit_fraction", "cloud_accuracy")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--checkpoints", nargs="+", default=DEFAULT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/tf32.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for ckpt in a.checkpoints:
        model, meta = load_model(ckpt)
        val = split_of(ckpt, load_cifar(meta["data"]["name"], a.data_dir), "val")
        thresholds = list(meta["policy"].thresholds)
        row = {"checkpoint": ckpt, "trained_on": meta.get("device"), "thresholds": thresholds, "n": len(val),
               "gpu": gpu_record(ckpt)}
        for name, transform in (("cpu fp32", None), ("cpu fp32 + 1e-7 noise", fp32_noise()),
                                ("cpu tf32 emulated", tf32_round)):
            row[name] = measure(model, val, thresholds, transform)
        rows.append(row)
    out = {"what": __doc__.splitlines()[0], "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "command": "python benchmarks/tf32.py --data-dir data", "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
