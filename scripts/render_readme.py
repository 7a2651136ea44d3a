#!/usr/bin/env python3
"""Render README.md and docs/results.md from results/*.json (and, for the per-layer table, the library itself).

Nothing here is a measured figure typed by hand: every number comes from a results file or from the energy model.
Each section is one function that reads (at most) one results file and returns markdown, or None when that file
does not exist yet (the section is then left out). To add a section, write such a function and list it in
README_SECTIONS or RESULTS_SECTIONS.

    python scripts/render_readme.py            # rewrite README.md and docs/results.md
    python scripts/render_readme.py --check    # exit 1 if either differs from what the results give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hybridexit.model.energy import energy_report, summary_table  # noqa: E402
from hybridexit.model.resnet import HybridConfig  # noqa: E402

README, RESULTS_DOC = "README.md", "docs/results.md"

# The CIFAR-10 targets of issue 3 (after the paper's headline): the float baseline and the 20E+10C binary hybrid.
# The checkpoint named "hybrid" is the one the README leads with and its usage section names.
TARGETS = {"cifar10": {"fp32": "c10-r32-fp32", "hybrid": "c10-r32-e20-b1-x20", "fp32_min": 0.90,
                       "exits_min": 0.60, "reduction_min": 5.5, "max_drop": 0.03,
                       # issue 21's floor: the paper's point (88.6 %, 59-65 % exits, 5.5x in its count) beaten at once
                       "paper_point": {"accuracy": 0.886, "exits": 0.60, "reduction": 6.0}}}
MAIN = TARGETS["cifar10"]["hybrid"]

# the paper's Table II: the same 16E+14C binary network (exit at 16) trained jointly and separately
TABLE2 = {"cifar10": ("c10-r32-e16-b1-x16-joint", "c10-r32-e16-b1-x16-separate",
                      "c10-r32-e16-b1-x16-separate-6exitep")}


def load(name: str) -> dict | None:
    p = ROOT / "results" / name
    return json.loads(p.read_text()) if p.exists() else None


def md_table(headers: list[str], rows: list[list], right: tuple[int, ...] = ()) -> str:
    """A GitHub markdown table; cells are already formatted strings, columns in ``right`` right-aligned."""
    align = ["right" if i in right else "left" for i in range(len(headers))]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True, colalign=align)


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def thresholds(p: dict) -> str:
    return ", ".join(f"{t:.3f}" for t in p["thresholds"]) or "-"


def ckpt_name(p: dict) -> str:
    return Path(p["checkpoint"]).name


def pretty(dataset: str) -> str:
    return dataset.upper().replace("CIFAR", "CIFAR-")


def plot_link(name: str, prefix: str = "") -> str:
    """A markdown link to a checkpoint's calibration plot in results/, or "" when there is none."""
    png = f"results/{name}-calibration.png"
    return f"[calibration plot]({prefix}{png})" if (ROOT / png).exists() else ""


# ---------------------------------------------------------------- README.md


def readme_head() -> str:
    return """# hybridexit

Conditionally deep hybrid networks across edge and cloud, after Long, Chakraborty and Roy (2020): a quantized
ResNet prefix with early exits runs on the device, and only the inputs its exits cannot decide go on to the
full-precision rest of the network in the cloud.

```
make demo    # sets up .venv and data/, then runs the shipped checkpoint as a local edge-cloud pair
make test    # the test suite (CPU, a few minutes)
```

hybridexit trains such networks (binary or k-bit edge layers, joint or separate optimization of the exits), picks
exit thresholds on a validation split held out of training, counts operations and energy per image from the real
modules, and runs conditional inference for real: the cloud half is only ever called on the samples that did not
exit, in process or as an edge client talking to a cloud server over HTTP.
"""


def _deployed(p: dict) -> tuple[str, str]:
    """(images per second vs FP32 at batch 1, bytes per offloaded sample) for a headline row, from the runs that
    measured this checkpoint at this row's thresholds (results/edge_speed.json, results/deploy_check.json); "-"
    where none did. FP32 rows: 1.00x and the raw features are not sent (the whole network is in one place)."""
    if not (p["network"]["exits"] if "network" in p else p.get("exits")):
        return "1.00x", "-"
    ckpt, thr = f"checkpoints/{ckpt_name(p)}", p.get("thresholds") or []

    def same(t):
        return t is not None and len(t) == len(thr) and all(abs(a - b) < 1e-9 for a, b in zip(t, thr))

    speed = next((r for r in (load("edge_speed.json") or {}).get("rows", [])
                  if r["checkpoint"] == ckpt and same(r["thresholds"])), None)
    sent = next((r for r in (load("deploy_check.json") or {}).get("rows", [])
                 if r["checkpoint"] == ckpt and same(r.get("thresholds"))), None)
    per_off = sent and sent["edge_summary"]["payload_bytes_per_offloaded"]
    return (f"{speed['speedup']:.2f}x ({speed['engine']})" if speed else "-",
            f"{per_off:,.0f} ({sent['codec']})" if per_off else "-")


def deployed_note() -> str:
    """Where the two deployment columns come from, and on which machine they were measured."""
    s = load("edge_speed.json") or {}
    if not s.get("rows"):
        return ""
    onnx = "; ".join(f"`{r['checkpoint'].rsplit('/', 1)[-1]}` {r['speedup_onnx']['b1']:.2f}x" for r in s["rows"]
                     if r.get("speedup_onnx"))
    return (f"*images/s vs FP32*: the hybrid (edge on the engine named, cloud half in PyTorch) against the FP32 "
            f"network in PyTorch, batch 1, one thread, in the same run: `python benchmarks/edge_speed.py` on {s['cpu']} "
            f"({s['cpu_flags']})"
            + (f"; with both float parts (the FP32 network and the cloud half) on ONNX Runtime instead (faster than "
               f"PyTorch for a float network at batch 1), the ratios are smaller: {onnx} "
               "([docs/engines.md](docs/engines.md#speed-resultsedge_speedjson))" if onnx else "")
            + "; *bytes per offloaded sample*: `make demo`'s deployed pair "
            "(`python benchmarks/deploy_check.py`), codec named; \"-\": not measured at that row's thresholds.\n\n")


def _headline_row(label: str, p: dict) -> list[str]:
    return [label, thresholds(p), pct(p["accuracy"]), pct(p["edge_fraction"]), f"{p['edge_uj']:.1f}",
            f"{p['cloud_uj']:.1f}", f"{p['expected_uj']:.1f}", f"{p['reduction']:.2f}x", *_deployed(p),
            p.get("paper", "")]


HEADLINE_HEADERS = ["test split", "threshold", "accuracy %", "exiting at the edge %", "edge uJ", "cloud uJ",
                    "expected uJ/image", "vs FP32", "images/s vs FP32, batch 1", "bytes per offloaded sample",
                    "paper"]


def guarantee_text(p: dict) -> str:
    """A Learn-then-Test row's guarantee in words (its policy's statement), and its risk measured on test."""
    g, risk = p["calibration"]["guarantee"], p.get("risk") or {}
    measured = (f"; measured on the test split: {pct(risk['risk_disagreement'])} % of the {risk['exited']:,} images "
                "that exit" if g["risk"] == "disagreement" and g["form"] == "conditional" and risk else "")
    return (f"Learn then Test on validation (`--risk {g['eps']:g} --delta {g['delta']:g}`, EPS chosen on validation: "
            f"{p.get('selection', 'its calibration record')}): {g['statement']}{measured}")


def describe_point(p: dict, fp32_val: float | None) -> str:
    """How a row's thresholds were chosen, from its calibration record (all on the validation split)."""
    c = p.get("calibration")
    if p["point"] == "paper threshold" or not c:
        return f"*{p['point']}*: the paper's fixed {', '.join(f'{t:g}' for t in p['thresholds'])}"
    if c.get("guarantee"):
        return f"*{p['point']}*: " + guarantee_text(p)
    if c["target"] == "min_accuracy":
        floor = ("" if fp32_val is None else f" (FP32's {pct(fp32_val)} % minus 2 points)"
                 if abs(fp32_val - 0.02 - c["value"]) < 1e-9 else " (set against an earlier FP32 teacher's validation "
                 "accuracy minus 2 points: results/history-*.json)")
        return f"*{p['point']}*: the lowest energy with validation accuracy at least {pct(c['value'])} %{floor}"
    if c["target"] == "max_drop" and c["value"] == 0:
        return (f"*{p['point']}*: the most exits with validation accuracy at least the network's own final "
                f"classifier's ({pct(c['cloud_accuracy'])} %), as no threshold reaches FP32's validation accuracy "
                "minus 2 points")
    if c["target"] == "exit_fraction":
        return f"*{p['point']}*: the best validation accuracy with {c['value']:.0%} of validation images at the edge"
    return f"*{p['point']}*: {c['target']} {c['value']:g} on validation"


def readme_headline() -> str | None:
    data = load("cifar10.json")
    t = TARGETS["cifar10"]
    rows = [p for p in (data or {}).get("points", []) if ckpt_name(p) in (t["fp32"], t["hybrid"])]
    hybrid = next((p for p in rows if p["name"] == t["hybrid"]), None)
    if hybrid is None:
        return None
    table = [_headline_row(f"FP32 `{p['name']}`" if not p["network"]["exits"] else f"`{t['hybrid']}`, {p['point']}", p)
             for p in rows]
    points = "; ".join(describe_point(p, data.get("fp32_val_accuracy")) for p in rows if p["network"]["exits"])
    net = hybrid["network"]
    bits = "binary" if net["edge_bits"] == 1 else f"{net['edge_bits']}-bit"
    return (f"## Result\n\nResNet-32 on CIFAR-10, {net['edge_layers']} {bits} convolutions at the edge with an exit at "
            f"layer {net['exits'][0]}, on the {hybrid['n']:,} test images; energy is computational, per image, from the "
            f"measured exit fractions (the paper's Table I constants).\n\n"
            + md_table(HEADLINE_HEADERS, table, right=(1, 2, 3, 4, 5, 6, 7, 8, 9)) + "\n\n"
            f"Thresholds, chosen on the validation split ({plot_link(t['hybrid'])}): {points}.\n\n"
            + deployed_note() + against_targets(data["points"]))


def floor(what, got, need, need_text, shortfall) -> str:
    """One target judged: "WHAT (at least NEED: met)" or "... **missed** by SHORTFALL)"; bigger is better."""
    return f"{what} (at least {need_text}: " + ("met)" if got >= need - 1e-9 else f"**missed** by {shortfall})")


def against_targets(points: list[dict]) -> str:
    t = TARGETS["cifar10"]
    by_name = {p["name"]: p for p in points}
    if t["fp32"] not in by_name or t["hybrid"] not in by_name:
        return ""
    fp = by_name[t["fp32"]]

    def mark(ok):
        return "met" if ok else "**missed**"

    def judged(hy):
        drop = fp["accuracy"] - hy["accuracy"]
        return (f"exits {pct(hy['edge_fraction'])} % (at least {100 * t['exits_min']:.0f} %: "
                f"{mark(hy['edge_fraction'] >= t['exits_min'])}), {hy['reduction']:.2f}x less energy (at least "
                f"{t['reduction_min']}x: {mark(hy['reduction'] >= t['reduction_min'])}), {100 * drop:.2f} points "
                f"below FP32 (at most {100 * t['max_drop']:.0f}: {mark(drop <= t['max_drop'] + 1e-9)})")

    text = (f"Against the targets: FP32 {pct(fp['accuracy'])} % (at least {100 * t['fp32_min']:.0f} %: "
            f"{mark(fp['accuracy'] >= t['fp32_min'])}); `{t['hybrid']}` at its calibrated threshold: "
            f"{judged(by_name[t['hybrid']])}.")
    for p in points:  # the same network at the exit target, when its calibration took the accuracy-floor branch
        if p["point"] == "exit target" and ckpt_name(p) == t["hybrid"]:
            text += f" At the exit target: {judged(p)}."
    pp, hy = t["paper_point"], by_name[t["hybrid"]]

    parts = [floor(f"accuracy {pct(hy['accuracy'])} %", hy["accuracy"], pp["accuracy"], f"{pct(pp['accuracy'])} %",
                   f"{100 * (pp['accuracy'] - hy['accuracy']):.2f} points"),
             floor(f"exits {pct(hy['edge_fraction'])} %", hy["edge_fraction"], pp["exits"], f"{pct(pp['exits'])} %",
                   f"{100 * (pp['exits'] - hy['edge_fraction']):.2f} points"),
             floor(f"{hy['reduction']:.2f}x less energy", hy["reduction"], pp["reduction"], f"{pp['reduction']:g}x",
                   f"{pp['reduction'] - hy['reduction']:.2f}x")]
    text += ("\n\nThe paper's point beaten on every axis at once (issue 21's floor), at the calibrated threshold: "
             + ", ".join(parts) + f"; against our own FP32 baseline: {100 * (fp['accuracy'] - hy['accuracy']):.2f} "
             "points lower.")
    return text + "\n"


# the CIFAR-100 headline of issue 20: the 24E+6C 4-bit point against the paper's (Fig. 4b / Table III), kept at this
# name whichever training schedule benchmarks/schedule_select.py chose on validation (the grid's 12 epochs or longer)
C100_HEADLINE = {"checkpoint": "checkpoints/c100-r32-e24-b4-x24", "selection": "c100-headline-selection.json",
                 "stores": "sweep-cifar100*.json", "sweep": "sweeps/paper-cifar100.toml",  # the grid, longer schedules
                 "exits_min": 0.52, "reduction_min": 4.1, "max_drop": 0.014,
                 "paper": "24E 4-bit: 1.4 points below FP32, 52 % exits, 4.8x (the paper's count)"}


def readme_cifar100() -> str | None:
    data = load("cifar100.json")
    if not data:
        return None
    mains = [p for p in data["points"] if p["point"] == "calibrated"]
    hybrids = [p for p in mains if p["network"]["exits"]]
    if hybrids:  # the best calibrated CIFAR-100 hybrid, in the headline's format
        rows = [_headline_row(f"`{p['name']}`", p) for p in mains if not p["network"]["exits"]]
        best = max(hybrids, key=lambda p: p["accuracy"])
        rows.append(_headline_row(f"`{best['name']}`", best))
        return "CIFAR-100:\n\n" + md_table(HEADLINE_HEADERS, rows, right=(1, 2, 3, 4, 5, 6, 7, 8, 9)) + "\n"
    sweep = load("sweep-cifar100.json") or []
    h = C100_HEADLINE
    selection, ckpt = load(h["selection"]) or {}, h["checkpoint"]
    heads = [r for store in sorted((ROOT / "results").glob(h["stores"])) for r in load(store.name) or []
             if r["checkpoint"] == ckpt and r["point"] in ("calibrated", "guaranteed", "paper threshold")]
    if not heads:
        return "CIFAR-100: no hybrid of the design-space sweep ([docs/sweep.md](docs/sweep.md)) measured yet.\n"
    name = ckpt.rsplit("/", 1)[-1]
    rows = [_headline_row(f"FP32 `{p['name']}`", p) for p in mains]
    rows += [_headline_row(f"`{name}`, {r['point']}", {**r, "paper": h["paper"] if i == 0 else ""})
             for i, r in enumerate(sorted(heads, key=lambda r: r["point"]))]
    text = ("CIFAR-100: the design-space sweep's headline point, 24 4-bit convolutions at the edge with an exit at "
            f"layer 24, trained {heads[0]['epochs']} epochs and calibrated on validation as every sweep point"
            + (" (chosen over " + ", ".join(str(c["epochs"]) for c in selection["candidates"] if c["checkpoint"] != ckpt)
               + f" epochs on validation: results/{h['selection']})" if selection.get("chosen") == ckpt else "") + ":\n\n"
            + md_table(HEADLINE_HEADERS, rows, right=(1, 2, 3, 4, 5, 6, 7, 8, 9)) + "\n\n")
    guaranteed = next((r for r in heads if r["point"] == "guaranteed"), None)  # the checkpoint's exit policy then
    if guaranteed:
        text += f"*guaranteed*, the checkpoint's exit policy: {guarantee_text(guaranteed)}.\n\n"
    cal = guaranteed or next((r for r in heads if r["point"] == "calibrated"), None)
    if cal and mains:
        drop, exits, red = mains[0]["accuracy"] - cal["accuracy"], cal["edge_fraction"], cal["reduction"]
        text += (f"Against issue 20's targets at the {cal['point']} threshold: " + ", ".join([
            floor(f"exits {pct(exits)} %", exits, h["exits_min"], f"{100 * h['exits_min']:.0f} %",
                  f"{100 * (h['exits_min'] - exits):.2f} points"),
            floor(f"{red:.2f}x less energy", red, h["reduction_min"], f"{h['reduction_min']}x",
                  f"{h['reduction_min'] - red:.2f}x"),
            f"{100 * drop:.2f} points below FP32 (at most {100 * h['max_drop']:.1f}: "
            + ("met)" if drop <= h["max_drop"] + 1e-9 else f"**missed** by {100 * (drop - h['max_drop']):.2f} points)")])
            + ". ")
    from hybridexit.workflows.sweep import load_sweep  # the grid's size, from the sweep file itself

    grid = {p.name for p in load_sweep(ROOT / h["sweep"]).points}
    done = sorted({r["name"] for r in sweep if r["point"] == "calibrated"} & grid)
    return text + (f"{len(done)} of the {len(grid)} CIFAR-100 grid points are measured"
                   + (" so far" if len(done) < len(grid) else "")
                   + "; each is in [docs/sweep.md](docs/sweep.md) with Fig. 4b and Fig. 5.\n")


def readme_usage() -> str:
    data = load("cifar10.json") or {"points": []}
    target = next((p for p in data["points"] if p["point"] == "exit target" and ckpt_name(p) == MAIN), None)
    ev = f"hybridexit evaluate checkpoints/{MAIN} --data-dir data --split test --json"
    evaluate = f"# the calibrated row above (real conditional inference on the test split)\n{ev}"
    if target:  # the exit-target row's thresholds, as the benchmark chose them on validation
        evaluate += f"\n# the exit-target row\n{ev} --thresholds " + " ".join(repr(t) for t in target["thresholds"])
    return f"""## Use

After `make demo` (or `make setup data`), from the repository root. `checkpoints/{MAIN}` is the network above,
`checkpoints/c10-r32-fp32` its FP32 teacher. `data/` holds CIFAR in the official layout: `make data` writes it
from an offline copy in `../shared/datasets` when there is one; without `--data-dir` the commands look in
`$HYBRIDEXIT_DATA`, then `~/.cache/hybridexit`, where the official archive is downloaded with an MD5 check.

```
. .venv/bin/activate
# the network: layers, bits, MACs and energy per layer
hybridexit summary --checkpoint checkpoints/{MAIN}
{evaluate}
# thresholds for another target, chosen on the checkpoint's validation split; a dry run writes nothing
hybridexit calibrate checkpoints/{MAIN} --data-dir data --exit-fraction 0.62 --dry-run --plot calib.png
# the cloud half as a server, the edge half as its client: it exits locally and sends only the rest
# (each takes half of the machine's cores unless told --threads: the two share one machine here)
export HYBRIDEXIT_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))')
hybridexit serve checkpoints/{MAIN} --port 8000 &
until curl -sf http://127.0.0.1:8000/healthz >/dev/null; do sleep 1; done
hybridexit edge checkpoints/{MAIN} --cloud http://127.0.0.1:8000 --data-dir data --limit 1000 \\
    --codec int8+zstd --out edge.jsonl
kill %1
```

Training writes a checkpoint folder: give it a new one (here under `runs/`, which git ignores), so the shipped
checkpoints are never overwritten. A recipe (`recipes/*.toml`) holds the training options; options given on the
command line override it. The chain behind the shipped checkpoints: `scripts/cifar10_pipeline.sh`.

```
# FP32 ResNet-32 from scratch
hybridexit train --data-dir data --out runs/fp32 --recipe recipes/fp32.toml
# 20E+10C binary with its exit at 20: the paper's joint recipe, initialized from the shipped FP32 network
hybridexit train --data-dir data --out runs/e20-b1 --recipe recipes/paper-xnor.toml \\
    --edge-layers 20 --edge-bits 1 --exits 20 --init checkpoints/c10-r32-fp32
# its exit thresholds, chosen on its own validation split and written as its exit policy
hybridexit calibrate runs/e20-b1 --data-dir data --max-drop 0.01 --write
```

"20E + 10C" counts the 30 convolutions inside the 15 residual blocks of ResNet-32: 20 at the edge, 10 in the cloud;
the float stem is always at the edge and the classifier always in the cloud, so a split point or an exit sits on a
block boundary. Every command has `--help`.
"""


# the docs the README links, in order, with what each holds (a new doc: add its line here)
DOCS = {
    "results.md": "every evaluated threshold point, the paper's Table II (joint vs separate), every intermediate "
                  "training stage and its figures, the per-layer energy table, training speed, the edge-cloud runtime "
                  "measurements",
    "architecture.md": "which module owns what, and where the code departs from the paper",
    "wire-format.md": "the edge-cloud protocol, `hybridexit serve` and `hybridexit edge`",
    "deploy.md": "the cloud server for real (token file, TLS certificate, systemd units) and the edge against it",
    "engines.md": "the edge half as real integer code: bit-packed XNOR-popcount kernels (`--engine packed`) and ONNX "
                  "Runtime's QLinearConv (`--engine onnx`, `hybridexit export`), their agreement with torch on the test "
                  "set and their measured speed against float",
    "recipes.md": "the binary-edge recipe options (RSign, RPReLU, ApproxSign, two-stage training, wider exits), what "
                  "each costs in energy, and the one command that trains the new recipe",
    "codecs.md": "feature codecs under 1 KB per offloaded sample (learned bottleneck, quantizers), 'send the image' "
                 "baselines, and communication energy per link",
    "trust.md": "exits with a stated guarantee (temperature scaling, Learn then Test: `calibrate --risk`), the edge "
                "that audits its exits online and spends more audits when its inputs drift (`edge --audit-rate "
                "--audit-burst-rate`), your own image folders, and CIFAR-10 under shift",
    "sweep.md": "the design space as one command (`hybridexit sweep`: edge layers x bits x exits x mode, on a laptop, "
                "with workers, on Ray or a GPU) and `hybridexit report`: the paper's Fig. 4, Fig. 5 and Tables II-IV",
}


def readme_docs() -> str:
    items = [f"- [docs/{name}](docs/{name}): {what}." for name, what in DOCS.items() if (ROOT / "docs" / name).exists()]
    return ("## More\n\n" + "\n".join(items) + "\n- `scripts/cifar10_pipeline.sh` and `recipes/`: the training chain "
            "behind the shipped checkpoints.\n\nREADME.md and docs/results.md are generated by `make readme` "
            "(`scripts/render_readme.py`) from `results/*.json`; `tests/test_readme.py` fails when they drift.\n")


# ---------------------------------------------------------------- docs/results.md


def results_head() -> str:
    return ("# Results\n\nGenerated by `make readme` (`scripts/render_readme.py`) from `results/*.json`: do not edit. "
            "The headline is in the [README](../README.md).\n")


RESULT_HEADERS = ["model", "training", "thresholds", "test accuracy %", "final classifier alone %", "exits at edge %",
                  "expected uJ/image", "reduction", "paper"]


def _result_row(p: dict) -> list[str]:
    return [f"`{p['name']}`", p.get("training", ""), thresholds(p), pct(p["accuracy"]), pct(p.get("cloud_accuracy")),
            pct(p["edge_fraction"]), f"{p['expected_uj']:.1f}", f"{p['reduction']:.2f}x", p.get("paper", "")]


def results_dataset(dataset: str) -> str | None:
    data = load(f"{dataset}.json")
    if not data:
        return None
    table = md_table(RESULT_HEADERS, [_result_row(p) for p in data["points"]], right=(2, 3, 4, 5, 6, 7))
    plots = [f"`{n}`: {plot_link(n, '../')}" for n in dict.fromkeys(ckpt_name(p) for p in data["points"])
             if plot_link(n) and n not in TABLE2.get(dataset, ())]
    text = (f"## {pretty(dataset)}: the shipped checkpoints\n\n{table}\n\n{data.get('note', '')}\n\n"
            + (f"Calibration (validation accuracy and energy against the share decided at the edge; the dashed line is "
               f"the chosen threshold): {', '.join(plots)}.\n" if plots else ""))
    if dataset == "cifar10":
        text += "\n" + against_targets(data["points"])
    return text + table2(dataset, data["points"])


def table2(dataset: str, points: list[dict]) -> str:
    by_name = {p["name"]: p for p in points}
    fixed = {ckpt_name(p): p for p in points if p["point"] == "paper threshold"}  # each one's paper-threshold row
    names = [n for n in TABLE2.get(dataset, ()) if n in by_name and n in fixed]
    if len(names) < 2:
        return ""
    rows = [[f"`{n}`", by_name[n]["training"], pct(fixed[n]["accuracy"]), pct(fixed[n]["edge_fraction"]),
             thresholds(by_name[n]), pct(by_name[n]["accuracy"]), pct(by_name[n]["edge_fraction"]),
             pct(by_name[n]["cloud_accuracy"]), plot_link(n, "../")] for n in names]
    thr = ", ".join(f"{t:g}" for t in fixed[names[0]]["thresholds"])
    # the paper's figures; a "(...)" entry only says how a point relates to another one of ours
    papers = "; ".join(p for p in (by_name[n]["paper"] for n in names) if p and not p.startswith("("))
    headers = ["model", "training", f"accuracy % at {thr}", f"exits % at {thr}", "calibrated threshold",
               "accuracy % calibrated", "exits % calibrated", "final classifier alone %", "calibration"]
    return (f"\n### Table II: 16E+14C binary, exit at 16, joint vs separate optimization\n\nPaper: {papers}. "
            f"Each network at the paper's threshold {thr} and at its calibrated one (chosen on validation as above); "
            "the calibration plot shows validation accuracy and energy against the share decided at the edge.\n\n"
            + md_table(headers, rows, right=(2, 3, 4, 5, 6, 7)) + "\n")


def _step_key(stage: dict):
    step = stage.get("pipeline_step") or "99"
    digits = "".join(c for c in step if c.isdigit())
    return int(digits or 99), step


def results_history(dataset: str) -> str | None:
    data = load(f"history-{dataset}.json")
    if not data:
        return None
    rows = []
    for s in sorted(data["stages"], key=_step_key):
        val = " / ".join(pct(v) for v in s["val"]["accuracy_by_output"].values())
        cal = s["val"]["calibration"]
        for p in s["test"]:
            own = p["name"] == s["name"]  # the stage's own row (its calibrated thresholds); then its other points
            rows.append([(s.get("pipeline_step") or "") if own else "", f"`{p['name']}`", s["training"] if own else "",
                         val if own else "", pct(cal["accuracy"]) if own and cal else "", thresholds(p),
                         pct(p["accuracy"]), pct(p["cloud_accuracy"]), pct(p["edge_fraction"]), f"{p['reduction']:.2f}x"])
    headers = ["step", "stage", "training", "val accuracy % (exits / final)", "val accuracy % at its thresholds",
               "thresholds", "test accuracy %", "final classifier alone %", "exits at edge %", "reduction"]
    return (f"## {pretty(dataset)}: intermediate training stages\n\n{data['note']} Steps as in "
            f"`scripts/cifar10_pipeline.sh`.\n\n" + md_table(headers, rows, right=(3, 4, 5, 6, 7, 8, 9)) + "\n")


def results_energy() -> str:
    cfg = HybridConfig(depth=32, num_classes=10, edge_layers=20, edge_bits=1, exits=(20,))
    r = energy_report(cfg)
    d = r.to_dict([0.65])
    return ("## ResNet-32 20E+10C binary, per layer\n\n```\n" + summary_table(r) + "\n```\n\n"
            f"With 65 % of images exiting at layer 20: edge {d['edge_uj']:.1f} uJ, cloud {d['cloud_uj']:.1f} uJ "
            f"(paid by the 35 % that go on), expected {d['expected_uj']:.1f} uJ per image against "
            f"{d['fp32_uj']:.1f} uJ for the FP32 network: {d['reduction']:.2f}x less computational energy "
            "(`hybridexit energy --edge-layers 20 --edge-bits 1 --exits 20 --exit-rate 0.65`). "
            "Energy constants: the paper's Table I.\n")


def results_train_speed() -> str | None:
    data = load("train_speed.json")
    if not data:
        return None
    rows = [[r["name"], f"{r['images_per_s']:.0f}", f"{r['step_ms']:.0f}", f"{r['relative_step']:.2f}x"]
            for r in data["runs"]]
    return (f"## Training speed\n\nMeasured on: {data.get('machine', 'an unrecorded machine')} "
            "(`python benchmarks/train_speed.py`).\n\n"
            + md_table(["network", "images/s", "step ms", "relative to FP32"], rows, right=(1, 2, 3)) + "\n")


def results_runtime() -> str | None:
    d = load("runtime.json")
    if not d:
        return None
    ip, m = d["in_process"], d.get("machine", {})
    codecs = [[c["codec"], "yes" if c["compressed"] else "no", f"{c['payload_bytes_per_offloaded']:,.0f}",
               f"{c['offloaded_vs_raw_image']:.2f}x", pct(c["accuracy"]), f"{c['accuracy_change_points']:+.2f}",
               f"{c['latency_ms_offloaded_p50']:.1f} / {c['latency_ms_offloaded_p95']:.1f}"] for c in d["codecs"]]
    conc = [[str(c["clients"]), f"{c['throughput_per_s']:.1f}",
             f"{c['latency_ms_edge_p50']:.1f} / {c['latency_ms_edge_p95']:.1f}",
             f"{c['latency_ms_offloaded_p50']:.1f} / {c['latency_ms_offloaded_p95']:.1f}",
             ", ".join(f"{k}: {v}" for k, v in c["server_batch_samples_seen"].items()), str(c["failed_requests"])]
            for c in d["concurrency"]]
    checks = ", ".join(f"{k}: {v}" for k, v in d.get("checks", {}).items())
    raw = d.get("raw_image_bytes")
    return (f"## Edge-cloud runtime\n\n`{d['model']}` ({d['checkpoint']}), {d['server']['transport']}, "
            f"{d['dataset']}, edge batch size {d['edge_batch_size']}; in process: accuracy {pct(ip['accuracy'])} %, "
            f"{100 * ip['edge_fraction']:.1f} % decided at the edge (`python benchmarks/runtime.py`).\n\n"
            + md_table(["codec", "zstd", "bytes per offloaded sample", f"vs raw image ({raw:,} B)", "accuracy %",
                        "change (points)", "offloaded p50 / p95 ms"], codecs, right=(2, 3, 4, 5, 6)) + "\n\n"
            + md_table(["clients", "inputs/s", "edge-decided p50 / p95 ms", "offloaded p50 / p95 ms",
                        "server batch sizes seen", "failed requests"], conc, right=(0, 1, 2, 3, 5)) + "\n\n"
            f"Checks: {checks}.\n\nMeasured with edge and cloud on one machine ({m.get('platform', '?')}, "
            f"{m.get('cpus', '?')} CPUs, {m.get('device', '?')}, torch {m.get('torch', '?')}), so latency and "
            "throughput describe that machine; bytes, accuracy and batching carry over. The edge sends features, "
            "which at a deep split can be more bytes than the raw image: the saving is the samples that never leave "
            "the device and the edge energy (see [wire-format.md](wire-format.md)).\n")


README_SECTIONS = [readme_head, readme_headline, readme_cifar100, readme_usage, readme_docs]
RESULTS_SECTIONS = [results_head, lambda: results_dataset("cifar10"), lambda: results_history("cifar10"),
                    lambda: results_dataset("cifar100"), lambda: results_history("cifar100"), results_energy,
                    results_train_speed, results_runtime]


def render(sections) -> str:
    return "\n".join(s.rstrip("\n") + "\n" for s in (fn() for fn in sections) if s)


def rendered() -> dict[str, str]:
    """What each generated file should hold: {path relative to the repository root: text}."""
    return {README: render(README_SECTIONS), RESULTS_DOC: render(RESULTS_SECTIONS)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is out of date")
    a = p.parse_args(argv)
    stale = []
    for rel, text in rendered().items():
        path = ROOT / rel
        if path.exists() and path.read_text() == text:
            continue
        stale.append(rel)
        if not a.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if a.check and stale:
        print(f"out of date (run make readme): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
