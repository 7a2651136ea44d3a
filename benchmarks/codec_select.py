"""Choose the headline's learned codec on the VALIDATION split -> results/codecs_selection.json ["headline"].

    python benchmarks/codec_select.py --checkpoint checkpoints/c10-r32-e20-b1-x20 --runs runs/codec-headline-* --data-dir data

Each run is a ``hybridexit train-codec`` run with the cloud half frozen (``tune_cloud = false``): its last stage's
best epoch (the best accuracy of the offloaded validation samples) is exported into a temporary copy of the
checkpoint (``export-codec RUN --out COPY``: the codec in COPY/codec/), and the checkpoint's offloaded validation
samples are sent through it as batch-size-1 wire frames, beside the fp32 codec at the same thresholds, every codec
in one pass over the split (``evaluate.evaluate_split``). Rule: the highest validation accuracy with the codec among
the runs under 1,024 bytes per offloaded validation sample. Runs that tuned the cloud half are listed with their
logs, not exported. The test split is not read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 1024


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/c10-r32-e20-b1-x20")
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default="results/codecs_selection.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from hybridexit import codecs
    from hybridexit.data import load_cifar
    from hybridexit.model.checkpoint import load_model, split_of
    from hybridexit.workflows import evaluate
    from hybridexit.workflows.codec_recipe import read_codec_recipe
    from hybridexit.workflows.train_codec import CODEC_RUN, RECIPE_COPY, export_codec

    model, meta = load_model(a.checkpoint)
    policy = meta["policy"]
    val = split_of(a.checkpoint, load_cifar(meta["data"]["name"], a.data_dir), "val")
    runs, trained = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        sent = {"fp32": evaluate.WireCodec(codecs.get("fp32"), a.checkpoint)}
        for run in map(Path, a.runs):
            if not (run / CODEC_RUN).is_file():
                continue
            stages = read_codec_recipe(run / RECIPE_COPY)
            entry = {"recipe": (run / RECIPE_COPY).read_text(),
                     "stages": {s: _log(run / s / "log.jsonl") for s in stages}}
            last = list(stages)[-1]
            done = max((r.get("epoch", 0) for r in entry["stages"][last]), default=0)
            if stages[last].tune_cloud or done < stages[last].epochs:
                entry["measured"] = None
                entry["why_not"] = ("tunes the cloud half" if stages[last].tune_cloud else
                                    f"not finished ({done} of {stages[last].epochs} epochs)")
            else:
                copy = Path(tmp) / run.name
                trained[run.name] = export_codec(run, copy)["trained"]
                sent[run.name] = evaluate.WireCodec(codecs.get("bn", checkpoint=copy), copy)
            runs[run.name] = entry
        # one pass over the validation split: the edge decides once, every codec sends the same offloaded features
        r = evaluate.evaluate_split(model, val, policy.thresholds, policy.temperatures or None, codecs=sent, plain=False)
    fp32 = r.codec_figures("fp32")
    for name, t in trained.items():
        m = r.codec_figures(name)
        runs[name]["measured"] = {"chosen_epoch": t["chosen_epoch"], "val_accuracy": m["accuracy"],
                                  "val_offloaded_accuracy": m["offloaded_accuracy"],
                                  "change_vs_fp32_points": 100 * (m["accuracy"] - fp32["accuracy"]),
                                  "bytes_per_offloaded": m["payload_bytes_per_offloaded"]}
    for name, entry in runs.items():
        print(f"{name}: {entry['measured'] or entry['why_not']}", file=sys.stderr, flush=True)
    off, fp32_off = len(r.remaining), fp32["offloaded_accuracy"]
    fit = {k: e["measured"] for k, e in runs.items() if e["measured"] and e["measured"]["bytes_per_offloaded"] <= BUDGET}
    chosen = max(fit, key=lambda k: fit[k]["val_accuracy"]) if fit else None
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res["headline"] = {
        "note": __doc__.split("\n\n", 2)[2].strip(), "checkpoint": a.checkpoint, "thresholds": list(policy.thresholds),
        "split": "val", "n": len(val), "offloaded": off, "fp32": {"val_accuracy": fp32["accuracy"],
                                                                 "val_offloaded_accuracy": fp32_off,
                                                                 "bytes_per_offloaded": fp32["payload_bytes_per_offloaded"]},
        "budget_bytes": BUDGET, "runs": runs, "chosen": chosen,
        "command": "python benchmarks/codec_select.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"chosen: {chosen}", file=sys.stderr)


if __name__ == "__main__":
    main()
