#!/usr/bin/env python3
"""Re-measure a shipped checkpoint's rows of a results file on the whole test split, without choosing anything.

For when an engine's arithmetic changes and the chosen networks do not: every row of ``--checkpoint`` in
``--results`` (a list of rows, or ``{"points": [...]}``) is re-evaluated at its own thresholds (the library call
behind ``hybridexit evaluate CKPT --split test --json --engine torch``), and its figures are replaced. A
``guaranteed`` row is the checkpoint's exit policy: it takes the policy's current thresholds, its calibration
(``hybridexit calibrate ... --json`` on validation, the command that wrote it: ``--calibrate-command``) and the
guarantee's risk on test (``benchmarks/guarantee.py risk``, given as its JSON output with ``--risk-json``).

    python benchmarks/recheck_rows.py --results results/sweep-cifar100-ep30.json \
        --checkpoint checkpoints/c100-r32-e24-b4-x24 --data-dir data [--calibration-json F --calibrate-command C \
        --risk-json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from hybridexit.data import load_cifar
from hybridexit.model.checkpoint import load_model
from hybridexit.workflows.evaluate import evaluate_checkpoint_summary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import FIGURES  # noqa: E402  (the figures of a results row: one list for both re-measuring tools)

CALIBRATION = ("split", "n", "target", "value", "accuracy", "cloud_accuracy", "exit_fraction", "edge_fraction",
               "expected_uj", "reduction", "temperatures", "guarantee", "previous_thresholds", "written")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--calibration-json", default=None, help="the guaranteed row's `hybridexit calibrate --json` output")
    p.add_argument("--calibrate-command", default=None)
    p.add_argument("--risk-json", default=None, help="the guaranteed row's `benchmarks/guarantee.py risk` output")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    path = Path(a.results)
    data = json.loads(path.read_text())
    rows = data["points"] if isinstance(data, dict) else data
    model, meta = load_model(a.checkpoint)
    policy = meta["policy"]
    ds = load_cifar(meta["data"]["name"], a.data_dir)
    sha = hashlib.sha256((Path(a.checkpoint) / "model.safetensors").read_bytes()).hexdigest()
    for row in rows:
        if row.get("checkpoint") != a.checkpoint:
            continue
        if row["point"] == "guaranteed":
            before, row["thresholds"] = row["thresholds"], list(policy.thresholds)
            if a.calibration_json:  # a --dry-run of the command that wrote the policy: the same validation figures
                cal = json.loads(Path(a.calibration_json).read_text())
                row["calibration"] = {k: cal[k] for k in CALIBRATION if k in cal} | {
                    "previous_thresholds": before, "written": True}
            if a.calibrate_command:
                row["calibrate_command"] = a.calibrate_command
            if a.risk_json:
                risk = json.loads(Path(a.risk_json).read_text())
                row["risk"] = {k: risk[k] for k in ("exited", "exited_disagreements", "risk_disagreement",
                                                    "exited_label_errors", "exited_label_error", "command")}
        temps = list(policy.temperatures) if row["point"] == "guaranteed" and policy.temperatures else None
        off = not row["thresholds"]  # a row without exits: threshold 0 exits nothing (the rule is entropy < t)
        s, _ = evaluate_checkpoint_summary(model, ds.test, [0.0] * len(model.cfg.exits) if off else row["thresholds"],
                                           temps)
        old = {k: row.get(k) for k in FIGURES}
        row.update({k: s[k] for k in (("n", "accuracy", "cloud_accuracy") if off else FIGURES)})
        if "weights_sha256" in row:
            row["weights_sha256"] = sha
        print(f"{row.get('name')} @ {row['point']}: accuracy {old['accuracy']} -> {s['accuracy']}, "
              f"edge {old['edge_fraction']} -> {s['edge_fraction']}")
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
