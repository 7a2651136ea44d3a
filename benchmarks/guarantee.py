#!/usr/bin/env python3
"""The headlines' Learn-then-Test exit policies: EPS chosen on VALIDATION by a rule fixed in advance, and the
guarantee's risk measured on the test split for the policy a checkpoint carries.

``select`` (reads no test data). Per checkpoint, one pass over its validation split; then, for every EPS of the
grid 0.005, 0.010, ..., 0.300, the thresholds that ``hybridexit calibrate CKPT --risk EPS --delta 0.1`` certifies
(``risk.ltt_policy`` on that pass: disagreement risk, conditional form, no temperature, the CLI's defaults).
Kind and form are those the online audit estimates and tests against the policy's EPS (``edge --audit-rate``);
no temperature keeps the headline's exit rule, the plain softmax entropy every engine implements. The reference is
the checkpoint's operating point before the guarantee (its latest exit policy without one: the current policy or,
once a guaranteed one is written, the newest of its history) and its exit share on validation. Chosen: the
smallest EPS whose thresholds decide at the edge at least the reference's share of the validation images. The
choice and every candidate go to ``results/guarantee_selection.json``; the chosen policy is then written by
``hybridexit calibrate CKPT --risk EPS --delta 0.1 --write`` (the command is in that file).

``risk`` (reads the test split: run it once per chosen policy). One pass over the test split at the checkpoint's
exit policy: among the test images that exit, the share whose edge answer differs from the full network's (the
guarantee's risk) and from the label.

    python benchmarks/guarantee.py select --data-dir data
    python benchmarks/guarantee.py risk --data-dir data --checkpoint checkpoints/c10-r32-e20-b1-x20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
from pathlib import Path

import torch

from hybridexit.calibration.risk import ltt_policy
from hybridexit.calibration.stats import collect_exit_stats
from hybridexit.data import load_cifar
from hybridexit.errors import TargetUnreachableError
from hybridexit.model.checkpoint import load_model, validation_split
from hybridexit.model.energy import energy_report
from hybridexit.model.hybrid import CLOUD
from hybridexit.model.policy import ExitPolicy, policy_history

HEADLINES = ["checkpoints/c10-r32-e20-b1-x20", "checkpoints/c100-r32-e24-b4-x24"]
EPS_GRID = [round(0.005 * i, 3) for i in range(1, 61)]
DELTA, KIND, FORM = 0.1, "disagreement", "conditional"
RULE = ("the smallest EPS of the grid whose Learn-then-Test thresholds (delta 0.1, disagreement risk, conditional "
        "form, no temperature) decide at the edge at least the share of the validation images that the policy "
        "before the guarantee decided there")


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{platform.machine()}, {cpu or 'cpu'}, torch {torch.__version__}"


def weights_sha256(ckpt) -> str:
    return hashlib.sha256((Path(ckpt) / "model.safetensors").read_bytes()).hexdigest()


def reference_policy(ckpt, current: ExitPolicy | None) -> ExitPolicy:
    """The checkpoint's operating point before the guarantee: its latest exit policy that carries none."""
    if current is not None and not current.guarantee:
        return current
    for d in reversed(policy_history(ckpt)):
        if not d.get("guarantee"):
            return ExitPolicy.from_dict(d)
    raise SystemExit(f"{ckpt}: no exit policy without a guarantee to compare with (calibrate it first)")


def point(stats, report, thresholds, temperatures=None) -> dict:
    """Validation figures at ``thresholds``, as ``calibrate`` reports them (the whole validation split)."""
    preds, decided = stats.simulate(tuple(thresholds), temperatures)
    n = len(stats.labels)
    fr = [int((decided == j).sum()) / n for j in range(len(thresholds))]
    return {"val_accuracy": stats.accuracy(preds), "val_edge_fraction": sum(fr),
            "val_reduction": report.fp32_uj / report.expected_uj(fr)}


def select_one(ckpt: str, data_dir) -> dict:
    model, meta = load_model(ckpt)
    ds = load_cifar(meta.get("data", {}).get("name", "cifar10"), data_dir)
    stats = collect_exit_stats(model, validation_split(ckpt, ds))
    report = energy_report(model.cfg)
    ref = reference_policy(ckpt, meta["policy"])
    reference = {"thresholds": list(ref.thresholds), "chosen_by": ref.chosen_by,
                 **point(stats, report, ref.thresholds, ref.temperatures or None)}
    candidates = []
    for eps in EPS_GRID:
        try:
            policy, _ = ltt_policy(stats, eps, DELTA, KIND, FORM, temperature=False)
        except TargetUnreachableError:
            candidates.append({"eps": eps, "certified": False})
            continue
        g = policy.guarantee
        candidates.append({"eps": eps, "certified": True, "thresholds": list(policy.thresholds),
                           "lambda": g["lambda"], "risk_hat": g["risk_hat"], "p_value": g["p_chosen"],
                           **point(stats, report, policy.thresholds)})
    ok = [c for c in candidates if c["certified"] and c["val_edge_fraction"] >= reference["val_edge_fraction"] - 1e-12]
    chosen = ok[0] if ok else None
    return {"checkpoint": ckpt, "weights_sha256": weights_sha256(ckpt), "val_images": len(stats.labels),
            "val_cloud_accuracy": stats.cloud_accuracy, "reference": reference, "candidates": candidates,
            "chosen": None if chosen is None else {
                "eps": chosen["eps"], "delta": DELTA, "kind": KIND, "form": FORM, "thresholds": chosen["thresholds"],
                "command": f"hybridexit calibrate {ckpt} --data-dir DATA --risk {chosen['eps']} --delta {DELTA} "
                           f"--risk-kind {KIND} --risk-form {FORM} --write"}}


def cmd_select(a) -> None:
    torch.set_num_threads(a.threads)
    rows = [select_one(c, a.data_dir) for c in a.checkpoints]
    out = {"what": "EPS of the headlines' Learn-then-Test exit policies, chosen on the VALIDATION split (test not "
                   "read)", "rule": RULE, "eps_grid": [EPS_GRID[0], EPS_GRID[-1], len(EPS_GRID)],
           "machine": f"{machine()}, {a.threads} thread(s)",
           "command": "python benchmarks/guarantee.py select --data-dir DATA", "checkpoints": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        c = r["chosen"]
        print(f"{r['checkpoint']}: " + ("no EPS of the grid reaches the reference's exit share" if c is None else
              f"EPS {c['eps']} -> thresholds {c['thresholds']}: {c['command']}"))


def cmd_risk(a) -> None:
    torch.set_num_threads(a.threads)
    model, meta = load_model(a.checkpoint)
    policy = meta["policy"]
    if policy is None:
        raise SystemExit(f"{a.checkpoint} has no exit policy: calibrate it first")
    ds = load_cifar(meta.get("data", {}).get("name", "cifar10"), a.data_dir)
    stats = collect_exit_stats(model, ds.test)
    _, decided = stats.simulate(policy.thresholds, policy.temperatures or None)
    exited = decided != CLOUD
    edge = stats.exit_preds.gather(1, decided.clamp(min=0)[:, None])[:, 0]
    m = int(exited.sum())
    dis = int((exited & (edge != stats.final_preds)).sum())
    wrong = int((exited & (edge != stats.labels)).sum())
    print(json.dumps({"checkpoint": a.checkpoint, "weights_sha256": weights_sha256(a.checkpoint), "split": "test",
                      "n": len(stats.labels), "thresholds": list(policy.thresholds), "exited": m,
                      "exited_disagreements": dis, "risk_disagreement": dis / m if m else None,
                      "exited_label_errors": wrong, "exited_label_error": wrong / m if m else None,
                      "command": f"python benchmarks/guarantee.py risk --data-dir DATA --checkpoint {a.checkpoint}"}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("select", help="choose EPS per headline on validation -> results/guarantee_selection.json")
    s.add_argument("--checkpoints", nargs="+", default=HEADLINES)
    s.add_argument("--out", default="results/guarantee_selection.json")
    s.set_defaults(func=cmd_select)
    r = sub.add_parser("risk", help="the guarantee's risk on the test split at the checkpoint's exit policy")
    r.add_argument("--checkpoint", required=True)
    r.set_defaults(func=cmd_risk)
    for q in (s, r):
        q.add_argument("--data-dir", default=None)
        q.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
