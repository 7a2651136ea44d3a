"""Issue 21's screening of binary-edge option sets on the validation split -> results/recipe-screen.json.

Each option set in ``recipes/screen-21/*.toml`` is trained for the same short single-stage schedule from the float
checkpoint (CIFAR-10 ResNet-32 20E+10C, binary edge, one exit at 20), one after another at one thread:

    for n in plain-sgd plain reactnet reactnet-head; do
      hybridexit train --recipe recipes/screen-21/$n.toml --edge-layers 20 --edge-bits 1 --exits 20 \\
          --data-dir data --out runs/screen21-$n --resume
    done
    .venv/bin/python benchmarks/recipe_screen.py --render

This script reads each run's ``log.jsonl`` (per epoch: the validation accuracy of the exit and of the final
classifier, and the epoch's seconds) and its network config (for the edge energy of the option set, from the
energy model), writes the JSON and, with --render, the table of docs/recipes.md between its markers. Validation
only: no test image is read. Runs not (or not yet) trained are listed as missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybridexit.model.checkpoint import network_config, read_config
from hybridexit.model.energy import energy_report
from hybridexit.workflows.recipes import read_recipe

ROOT = Path(__file__).resolve().parents[1]
SCREEN = ROOT / "recipes" / "screen-21"
RESULTS = ROOT / "results" / "recipe-screen.json"
DOC = ROOT / "docs" / "recipes.md"
BEGIN, END = "<!-- recipe-screen:begin (benchmarks/recipe_screen.py --render) -->", "<!-- recipe-screen:end -->"
ORDER = ("plain-sgd", "plain", "reactnet", "reactnet-head")


def collect(runs: Path) -> dict:
    rows = []
    for name in ORDER:
        train, net = read_recipe(SCREEN / f"{name}.toml")
        run = runs / f"screen21-{name}"
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] \
            if (run / "log.jsonl").is_file() else []
        row = {"name": name, "recipe": f"recipes/screen-21/{name}.toml", "options": net,
               "schedule": {k: train[k] for k in ("optimizer", "lr", "epochs", "kd_alpha", "kd_temperature")},
               "epochs_done": len(log), "val_exit": [e["val_acc"][0] for e in log],
               "val_final": [e["val_acc"][1] for e in log], "epoch_s": [e["epoch_s"] for e in log]}
        if (run / "config.json").is_file():
            rep = energy_report(network_config(read_config(run)))
            row["edge_uj"], row["exit_path_uj"] = rep.edge_uj, rep.exit_path_uj[0]
        rows.append(row)
    return {"what": "issue 21 screening: option sets at equal short budget from the float checkpoint, validation "
                    "accuracy per epoch (exit at 20 / final classifier)", "runs": str(runs), "rows": rows,
            "command": "python benchmarks/recipe_screen.py --render"}


def table(r: dict) -> str:
    lines = ["| option set | options | optimizer, lr, KD (alpha / T) | epochs | val exit % | val final % | edge uJ |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        s = row["schedule"]
        opts = ", ".join(f"{k} = {v}" for k, v in row["options"].items()) or "none (the paper's network)"
        done = row["epochs_done"]
        lines.append(f"| `{row['name']}` | {opts} | {s['optimizer']}, {s['lr']:g}, {s['kd_alpha']:g} / "
                     f"{s['kd_temperature']:g} | {done} of {s['epochs']} | "
                     + (" / ".join(f"{100 * v:.2f}" for v in row["val_exit"]) if done else "missing") + " | "
                     + (" / ".join(f"{100 * v:.2f}" for v in row["val_final"]) if done else "missing") + " | "
                     + (f"{row['edge_uj']:.2f}" if "edge_uj" in row else "") + " |")
    return "\n".join(lines) + "\n\nPer epoch (epoch 1 / epoch 2), on the 5,000 validation images; generated from " \
                              "`results/recipe-screen.json` by `benchmarks/recipe_screen.py --render`."


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs"), help="folder holding runs/screen21-<name>")
    ap.add_argument("--render", action="store_true", help="also rewrite docs/recipes.md's screening table")
    a = ap.parse_args(argv)
    r = collect(Path(a.runs))
    r["runs"] = "runs"
    RESULTS.write_text(json.dumps(r, indent=2) + "\n")
    if a.render:
        sys.path.insert(0, str(ROOT / "scripts"))
        from splice import splice_file

        splice_file(DOC, BEGIN, END, table(r) + "\n")


if __name__ == "__main__":
    main()
