#!/usr/bin/env python3
"""Choose between training schedules of one design point on VALIDATION only, and record the choice.

Each candidate checkpoint is the same point (same network, same sweep recipe) trained on a different schedule and
calibrated to the same validation target by the sweep. This evaluates every candidate on its own validation split at
its calibrated thresholds (never the test split) and picks, among the candidates whose validation accuracy reaches
the target the calibration aimed at, the one with the largest energy reduction (ties: the higher accuracy). The
README's CIFAR-100 headline cites the checkpoint chosen here (scripts/render_readme.py reads this file).

    python benchmarks/schedule_select.py --data-dir data \\
        --candidates runs/checkpoints/c100-r32-e24-b4-x24-joint-k3 checkpoints/c100-r32-e24-b4-x24

(The 30-epoch run was kept by `hybridexit sweep ... --epochs 30` as checkpoints/c100-r32-e24-b4-x24-joint-k3-ep30;
once chosen here it took the headline's name, and the grid's 12-epoch checkpoint the sweep's own name for the point.)
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from hybridexit.data import load_cifar
from hybridexit.model.checkpoint import load_model, read_config, split_of
from hybridexit.workflows.evaluate import evaluate_checkpoint_summary

DEFAULT = ["runs/checkpoints/c100-r32-e24-b4-x24-joint-k3", "checkpoints/c100-r32-e24-b4-x24"]  # 12 and 30 epochs


def measure(path: str, data_dir) -> dict:
    model, meta = load_model(path)
    policy = meta["policy"]
    ds = load_cifar(meta.get("data", {}).get("name", "cifar10"), data_dir)
    summary, _ = evaluate_checkpoint_summary(model, split_of(path, ds, "val"), policy.thresholds,
                                             policy.temperatures or None)
    return {"checkpoint": path, "epochs": meta["epochs_done"], "thresholds": list(policy.thresholds),
            "target": policy.chosen_by.get("value"), "val_accuracy": summary["accuracy"],
            "val_edge_fraction": summary["edge_fraction"], "val_cloud_accuracy": summary["cloud_accuracy"],
            "val_reduction": summary["reduction"]}


def choose(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["target"] is None or r["val_accuracy"] >= r["target"] - 1e-9]
    return max(ok, key=lambda r: (r["val_reduction"], r["val_accuracy"]), default=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--candidates", nargs="+", default=DEFAULT)
    ap.add_argument("--out", default="results/c100-headline-selection.json")
    a = ap.parse_args()
    for c in a.candidates:  # one network, several schedules: refuse a mix of design points
        if read_config(c)["network"] != read_config(a.candidates[0])["network"]:
            raise SystemExit(f"{c} is another network than {a.candidates[0]}; compare schedules of one point only")
    rows = [measure(c, a.data_dir) for c in a.candidates]
    chosen = choose(rows)
    out = {"what": "training schedule of one design point, chosen on the VALIDATION split (test not read)",
           "rule": "largest validation energy reduction among candidates whose validation accuracy reaches the "
                   "calibration target; ties: higher accuracy",
           "machine": platform.processor() or platform.machine(), "candidates": rows,
           "chosen": chosen and chosen["checkpoint"]}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
