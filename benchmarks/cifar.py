#!/usr/bin/env python3
"""Evaluate the CIFAR-10 or CIFAR-100 checkpoints on the test split and write results/<dataset>.json.

For every hybrid checkpoint: thresholds are calibrated on the validation split (held out of training, never the
test split) and written as its exit policy (exit_policy.json beside the weights); then the test split is evaluated
with real conditional inference by the same code as `hybridexit evaluate CKPT --split test --json`, which
therefore reproduces these figures.
Calibration target (primary): the lowest expected energy whose validation accuracy is at least the FP32
baseline's validation accuracy minus 2 points (i.e. within the 3-point budget with a margin); if the hybrid cannot
reach that floor, the most exits that cost nothing on validation (accuracy at least the hybrid's own final
classifier's, ``--max-drop 0``) provided they are at least the dataset's exit target plus a 2-point margin (62 % of
the validation images at the edge on CIFAR-10, whose target is 60 %; 54 % on CIFAR-100, the paper's 52 %); else
the best validation accuracy at that exit target, so that the exit target still holds on the test split.
The paper's fixed threshold (0.5 on CIFAR-10, 1.0 on CIFAR-100) is
evaluated too, as a second row.

Rows whose checkpoint left checkpoints/ are dropped; the figures of the intermediate training stages removed in
issue 19 are a record in results/history-<dataset>.json, not regenerated. Every row also records its figures on
the first 100 test images ("slice"), which tests/test_results.py re-evaluates; --slice-only recomputes just
those, at each row's thresholds, without calibrating (seconds per checkpoint).

    python benchmarks/cifar.py --data-dir data [--dataset cifar100] [--checkpoints NAME ...] [--slice-only | --recheck]

``--recheck`` re-evaluates existing rows on the whole test split at their own thresholds (no calibration): for
when an engine's arithmetic changes and the chosen networks and policies do not.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hybridexit.calibration.calibrate import calibrate_checkpoint, validation_split
from hybridexit.calibration.stats import collect_exit_stats
from hybridexit.data import load_cifar
from hybridexit.model.checkpoint import load_model, read_config
from hybridexit.workflows.evaluate import evaluate_checkpoint_summary

# Per dataset: the checkpoint-name prefix, the paper's fixed exit threshold, the fallback calibration target
# (exit fraction on validation: the exit target plus a 2-point margin), and the checkpoints
# evaluated by default (in table order) with the paper's figure each is compared to.
DATASETS = {
    "cifar10": {"prefix": "c10", "paper_threshold": 0.5, "fallback": ("exit_fraction", 0.62), "paper": {
        "c10-r32-fp32": "FP32 ResNet-32: 92.5-93.5 % (published)",
        "c10-r32-e20-b1-x20": "88.6 %, 59-65 % exits, 5.5x",
        "c10-r32-e20-b1-x20-xnor": "(the paper's plain XNOR recipe, chained fine-tunes)",
        "c10-r32-e16-b1-x16-joint": "joint: 89.16 %, 52.8 % exits",
        "c10-r32-e16-b1-x16-separate": "separate: 88.72 %, 24.1 % exits",
        "c10-r32-e16-b1-x16-separate-6exitep": "(the separate one, its exit trained 5 more epochs)",
    }},
    "cifar100": {"prefix": "c100", "paper_threshold": 1.0, "fallback": ("exit_fraction", 0.54), "paper": {
        "c100-r32-fp32": "FP32 ResNet-32: about 70 % (published)",
    }},
}


def describe_training(meta: dict) -> str:
    t = meta["train"]
    if t["mode"] == "separate":
        s = f"separate, {t['epochs']} ep backbone + {t['exit_epochs']} ep exit"
    elif t["mode"] == "cloud":
        s = f"cloud half only (edge and exit frozen), {meta['epochs_done']} ep"
        if t.get("easy_weight", 1.0) != 1.0:
            s += f", exit-decided samples weighted {t['easy_weight']:g}"
    else:
        s = f"{t['mode'] if meta['network']['exits'] else 'float'}, {meta['epochs_done']} ep"
    if t.get("init"):
        s += f", init {Path(t['init']).name}"
    if t.get("teacher"):
        s += f", distilled from {Path(t['teacher']).name}"
    if t.get("optimizer", "sgd") != "sgd":
        s += f", {t['optimizer']} lr {t['lr']:g}"
    return s + f", {meta['train_wall_s'] / 60:.0f} min CPU"


# every row also records its figures on the first SLICE test images, which tests/test_results.py re-evaluates
SLICE = 100


def slice_figures(model, ds, thresholds, temperatures=None) -> dict:
    """The row's figures on the first SLICE test images (what `hybridexit evaluate --limit SLICE --json` prints)."""
    s, _ = evaluate_checkpoint_summary(model, ds.test.limit(SLICE), thresholds, temperatures)
    return {"split": "test", "first": SLICE, **{k: s[k] for k in ("accuracy", "cloud_accuracy", "exit_fraction")}}


def row_temperatures(row: dict, policy):
    """The exit temperatures a row was evaluated with: the checkpoint policy's, except at the paper's threshold."""
    return None if policy is None or row["point"] == "paper threshold" else (policy.temperatures or None)


def add_slices(points: dict, ds) -> None:
    """Recompute only the slice figures of existing rows, at each row's own thresholds (no calibration)."""
    models = {}
    for pt in points.values():
        if pt["checkpoint"] not in models:
            models[pt["checkpoint"]] = load_model(pt["checkpoint"])
        model, meta = models[pt["checkpoint"]]
        pt["slice"] = slice_figures(model, ds, pt["thresholds"], row_temperatures(pt, meta["policy"]))


FIGURES = ("n", "accuracy", "cloud_accuracy", "exit_fraction", "edge_fraction", "expected_uj", "edge_uj", "cloud_uj",
           "fp32_uj", "reduction")


def recheck(points: dict, ds, names: list[str] | None) -> list[str]:
    """Re-evaluate existing rows on the whole test split at each row's own thresholds (no calibration: the same
    chosen networks and policies), for the rows of ``names`` (default: every row); returns the rows whose figures
    changed. For when the arithmetic of an engine changes, not the networks."""
    models, changed = {}, []
    for pt in points.values():
        if names and Path(pt["checkpoint"]).name not in names:
            continue
        if pt["checkpoint"] not in models:
            models[pt["checkpoint"]] = load_model(pt["checkpoint"])
        model, meta = models[pt["checkpoint"]]
        temps = row_temperatures(pt, meta["policy"])
        s, _ = evaluate_checkpoint_summary(model, ds.test, pt["thresholds"], temps)
        new = {k: s[k] for k in FIGURES}
        if any(pt.get(k) != v for k, v in new.items()):
            changed.append(pt["name"])
        pt.update(new, slice=slice_figures(model, ds, pt["thresholds"], temps))
    return changed


def benchmark(path: Path, ds, spec: dict, fp32_val, out: Path) -> list[tuple[str, str, dict, dict | None, dict]]:
    """Calibrate one checkpoint on val (its exit policy) and evaluate it on test: (row name, point, summary, cal, slice)."""
    name = path.name
    cal = None
    if read_config(path)["network"]["exits"]:
        fallback = spec["fallback"]
        target = fallback if fp32_val is None else ("min_accuracy", fp32_val - 0.02)
        chain = [("max_drop", 0.0, fallback[1]), fallback]  # exits that cost nothing, if they reach the exit target
        cal = calibrate_checkpoint(path, ds, *target, plot_path=out.parent / f"{name}-calibration.png", write=True,
                                   fallback=chain, also=fallback)
        at_target = cal.pop("also")  # the exit-target point, chosen on the same validation pass
    model, meta = load_model(path)
    policy = meta["policy"]
    temps = row_temperatures({"point": "calibrated"}, policy)
    summary, _ = evaluate_checkpoint_summary(model, ds.test, policy.thresholds if policy else (), temps)
    rows = [(name, "calibrated", summary, cal, temps)]
    if meta["network"]["exits"]:
        paper_thr = [spec["paper_threshold"]] * len(meta["network"]["exits"])
        s2, _ = evaluate_checkpoint_summary(model, ds.test, paper_thr)
        rows.append((paper_row(spec, name), "paper threshold", s2, None, None))
        if cal["target"] != spec["fallback"][0]:  # the floor was reachable: also report the exit-target point
            s3, _ = evaluate_checkpoint_summary(model, ds.test, at_target["thresholds"], temps)
            rows.append((target_row(spec, name), "exit target", s3, at_target, temps))
    return [(rname, kind, s, c, slice_figures(model, ds, s["thresholds"], t)) for rname, kind, s, c, t in rows]


def paper_row(spec: dict, name: str) -> str:  # the row evaluated at the paper's fixed threshold
    return f"{name} @ paper threshold {spec['paper_threshold']}"


def target_row(spec: dict, name: str) -> str:  # the row at the exit target, when the accuracy floor chose another point
    return f"{name} @ exit target ({spec['fallback'][1]:.0%} of val at the edge)"


def fp32_val_accuracy(root: str, spec: dict, ds):
    fp_path = Path(root) / f"{spec['prefix']}-r32-fp32"
    if not (fp_path / "config.json").exists():
        return None
    return collect_exit_stats(load_model(fp_path)[0], validation_split(fp_path, ds)).cloud_accuracy


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    p.add_argument("--checkpoints", nargs="*", default=None, help="default: every known checkpoint of the dataset")
    p.add_argument("--root", default="checkpoints")
    p.add_argument("--out", default=None, help="default: results/<dataset>.json")
    p.add_argument("--slice-only", action="store_true",
                   help=f"only recompute every row's figures on the first {SLICE} test images, at its thresholds")
    p.add_argument("--recheck", action="store_true",
                   help="re-evaluate the rows of --checkpoints (default: all) on the whole test split at their own "
                        "thresholds, without calibrating")
    a = p.parse_args()
    spec = DATASETS[a.dataset]
    paper, default = spec["paper"], list(spec["paper"])
    ds = load_cifar(a.dataset, a.data_dir)
    out = Path(a.out or f"results/{a.dataset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)  # calibration plots go beside it, before it is written
    old = json.loads(out.read_text()) if out.exists() else {"points": []}
    # rows whose checkpoint left checkpoints/ are dropped (their figures live in results/history-<dataset>.json)
    points = {pt["name"]: pt for pt in old["points"] if (Path(pt["checkpoint"]) / "config.json").exists()}
    if a.slice_only or a.recheck:
        if old.get("data_checksum") != ds.checksum:
            raise SystemExit(f"{ds.source} is another copy of {a.dataset} than {out} was measured on")
        if a.recheck:
            print("changed:", recheck(points, ds, a.checkpoints) or "none")
        else:
            add_slices(points, ds)
        out.write_text(json.dumps({**old, "points": list(points.values())}, indent=1) + "\n")
        return
    fp32_val = fp32_val_accuracy(a.root, spec, ds)
    for name in a.checkpoints or default:
        path = Path(a.root) / name
        if not (path / "config.json").exists():
            print(f"skip {name}: no checkpoint")
            continue
        t0 = time.time()
        points.pop(target_row(spec, name), None)  # from an earlier run whose calibration may have taken the other branch
        rows = benchmark(path, ds, spec, fp32_val, out)
        meta = read_config(path)
        for rname, kind, s, c, sl in rows:
            points[rname] = {
                "name": rname, "point": kind, "checkpoint": str(path), "training": describe_training(meta),
                "network": meta["network"], "thresholds": s["thresholds"],
                "calibration": c, "paper": paper.get(name, "") if rname == name else "",
                "command": f"hybridexit evaluate {path} --data-dir DATA --split test --json"
                if rname == name else f"... --thresholds {' '.join(map(str, s['thresholds']))}",
                **{k: s[k] for k in FIGURES},
                "slice": sl,
            }
        s = rows[0][2]
        print(f"{name}: acc {s['accuracy']:.4f} edge {s['edge_fraction']:.3f} "
              f"reduction {s['reduction']:.2f}x ({time.time() - t0:.0f} s)")
    write_results(out, a.dataset, spec, ds, fp32_val, points, default)


def write_results(out: Path, dataset: str, spec: dict, ds, fp32_val, points: dict, default: list[str]) -> None:
    order = [r for n in default for r in (n, paper_row(spec, n), target_row(spec, n))]
    ordered = sorted(points.values(), key=lambda pt: order.index(pt["name"]) if pt["name"] in order else len(order))
    pretty = dataset.upper().replace("CIFAR", "CIFAR-")
    result = {"dataset": dataset, "split": "test", "data_checksum": ds.checksum,
              "fp32_val_accuracy": fp32_val, "points": ordered,
              "note": f"Accuracies are on the {len(ds.test):,} {pretty} test images; thresholds were chosen on a "
                      "5,000-image validation split held out of the training set: the lowest expected energy with validation "
                      "accuracy at least the FP32 baseline's minus 2 points or, when no threshold reaches that floor, "
                      "the most exits with validation accuracy at least the hybrid's own final classifier's, if "
                      f"they decide at least {spec['fallback'][1]:.0%} of it at the edge, else the best validation "
                      f"accuracy with {spec['fallback'][1]:.0%} of it at the edge; a checkpoint calibrated by another rule also "
                      "gets an '@ exit target' row at that edge fraction (its thresholds are not written into the "
                      "checkpoint). Energy is computational (MACs and adds), per "
                      "image, from the measured exit fractions; the paper's Table I constants."}
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
