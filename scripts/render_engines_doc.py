"""Render the figures section of docs/engines.md from results/edge_speed.json and results/edge_agreement.json.

    python scripts/render_engines_doc.py [--check]
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

from splice import render_main, splice

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "engines.md"
BEGIN, END = "<!-- engines:figures -->", "<!-- /engines:figures -->"


# issue 34's targets: hybrid vs FP32 at batch 1 (floor, goal) per dataset; edge half vs float (floor, goal)
HYBRID_TARGETS = {"cifar10": (4, 6), "cifar100": (2, 3)}
EDGE_TARGET = (6, 10)


def _verdict(x: float, floor: float, goal: float) -> str:
    return f"floor {floor}x {'met' if x >= floor else 'missed'}, goal {goal}x {'met' if x >= goal else 'missed'}"


def speed_row(s: dict, r: dict) -> list[str]:
    engines = list(r["hybrid_img_s"])
    out = [f"### `{r['checkpoint']}` ({r['dataset']}, against `{r['fp32_checkpoint']}`)", "",
           f"The first {r['images']} {r['dataset']} test images; exit fraction on them {r['exit_fraction']:.3f} at "
           f"threshold {', '.join(f'{t:.4g}' for t in r['thresholds'])}; `--engine auto` picks **{r['auto_engine']}**. "
           "Images per second (speedup against the float row above it):", "",
           "| variant | batch 1 | batch 64 |", "| --- | ---: | ---: |",
           f"| FP32 ResNet-32, PyTorch | {r['fp32_img_s']['b1']} | {r['fp32_img_s']['b64']} |"]
    for e in engines:
        h, x = r["hybrid_img_s"][e], r["hybrid_speedup"][e]
        out.append(f"| hybrid, edge on {e}, cloud PyTorch | {h['b1']} ({x['b1']}x) | {h['b64']} ({x['b64']}x) |")
    if r.get("fp32_onnx_img_s"):  # the float parts in ONNX Runtime too
        fo, ho, xo = r["fp32_onnx_img_s"], r["hybrid_cloud_onnx"], r["speedup_onnx"]
        out += [f"| FP32 ResNet-32, ONNX Runtime | {fo['b1']} | {fo['b64']} |",
                f"| hybrid, edge on {ho['edge']}, cloud ONNX Runtime (against the row above) | {ho['img_s']['b1']} "
                f"({xo['b1']}x) | {ho['img_s']['b64']} ({xo['b64']}x) |"]
    f = r["edge_img_s"]["float"]
    out.append(f"| edge half alone, same layers in float PyTorch | {f['b1']} | {f['b64']} |")
    for e in engines:
        h, x = r["edge_img_s"][e], r["edge_half_speedup"][e]
        out.append(f"| edge half alone on {e} | {h['b1']} ({x['b1']}x) | {h['b64']} ({x['b64']}x) |")
    floor, goal = HYBRID_TARGETS.get(r["dataset"], (2, 3))
    best = r["engine"]
    half = r["edge_half_speedup"].get("packed", {}).get("b1")
    ms = r["per_image_ms"]
    dec = ms["decide"][best]
    out += ["", f"Hybrid vs FP32 at batch 1 with the best engine ({best}): **{r['speedup']}x** "
            f"({_verdict(r['speedup'], floor, goal)}). "
            + (f"Edge half on the packed engine vs the same layers in float at batch 1: **{half}x** "
               f"({_verdict(half, *EDGE_TARGET)}). " if half is not None else "")
            + f"Per image at batch 1 on {best}: the edge decision {dec['b1']} ms, the cloud half "
            f"{ms['cloud_per_offloaded']['b1']} ms per offloaded image, {ms['cloud_share']['b1']} ms per image at this "
            f"exit rate, against {ms['fp32']['b1']} ms for FP32 "
            f"({'the cloud half' if ms['cloud_share']['b1'] > dec['b1'] else 'the edge decision'} is the larger part).",
            (f"With the float parts in ONNX Runtime as well (PyTorch's per-operation overhead dominates a float "
               f"network at batch 1), the hybrid is **{r['speedup_onnx']['b1']}x** FP32 at batch 1 "
               f"({r['speedup_onnx']['b64']}x at batch 64): the ratio against FP32 in its own fastest engine here; "
               f"the ONNX cloud half predicts as the PyTorch one on {r['hybrid_cloud_onnx']['same_prediction_as_pytorch_cloud']}"
               f" of the {r['images']} images." if r.get("speedup_onnx") else ""),
            "Edge artifact bytes: " + ", ".join(f"{k} {v:,}" for k, v in r["edge_bytes"].items()) +
            " (float and torch: safetensors state dicts of the float edge and of the quantized edge's latent float "
            "weights).", ""]
    return out


def speed_section(s: dict) -> list[str]:
    out = ["## Speed (`results/edge_speed.json`)", "",
           f"One thread, {s['cpu']} ({s['cpu_flags']}), torch {s['torch']}, each variant's fastest of {s['rounds']} "
           f"interleaved rounds; `{s['command'].split(' --note')[0].strip()}`. {s.get('note', '')}", ""]
    for r in s["rows"]:
        out += speed_row(s, r)
    return out


def engine_agreement_section(d: dict) -> list[str]:
    """results/engine_agreement.json: each engine against the torch engine on a whole split (issue 34's 99.9 %),
    with the float64 network and the torch engine's own batch-size reproducibility where measured."""
    out = ["## Agreement of the headlines with the torch engine (`results/engine_agreement.json`)", "",
           "`python benchmarks/engine_agreement.py --checkpoint CKPT --engine E --torch-batch-check 1 [--fp64-check]`: "
           "the library call behind `hybridexit evaluate CKPT --split test --engine E`, one thread, batches of 500. "
           "*same* = same decision (exit or cloud) and same prediction as the torch engine; *torch batch 1 vs 500*: "
           "the torch engine against itself when only the batch size changes; the float64 columns (where measured) "
           "compare each engine with the torch network computed in float64.", "",
           "| checkpoint | engine | images | same decision | same prediction | same (both) | vs float64: engine / torch | "
           "torch batch 1 vs 500 | accuracy torch / engine |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in d["rows"]:
        n = r["n"]
        f64 = r.get("float64_torch") or {}
        eng = r["engine"]
        v64 = (f"{100 * f64[r['engine']]['same_both'] / n:.2f} / {100 * f64['torch']['same_both'] / n:.2f} %"
               if f64 else "")
        selfa = r.get("torch_self_agreement")
        out.append(f"| `{r['checkpoint'].rsplit('/', 1)[-1]}` | {eng} | {n:,} | {r['same_decision']:,} | "
                   f"{r['same_prediction']:,} | {r['same_both']:,} ({100 * r['same_both'] / n:.2f} %) | {v64} | "
                   + (f"{100 * selfa['same_both'] / n:.2f} %" if selfa else "") + " | "
                   f"{100 * r['accuracy']['torch']:.2f} / {100 * r['accuracy'][r['engine']]:.2f} % |")
    causes = Counter((r["checkpoint"].rsplit("/", 1)[-1] + " on " + r["engine"],
                      re.sub(r" at conv \d+", "", (x.get("cause") or "").split(";")[0].split(" (")[0]))
                     for r in d["rows"] for x in r["disagreements"])
    if causes:
        out += ["", "Causes of the disagreements (first part of each traced cause): " + "; ".join(
            f"{e}: {k or 'not traced'} ({n})" for (e, k), n in sorted(causes.items())) + "."]
    return out + [""]


def agreement_section(a: dict) -> list[str]:
    out = ["## Agreement of the plain XNOR checkpoint, traced (`results/edge_agreement.json`)", "",
           f"`hybridexit evaluate {a['checkpoint']} --data-dir data --split {a['split']} --engine E --json --out E.jsonl`, "
           f"then `python benchmarks/edge_agreement.py`; {a['n']:,} images.", "",
           "| engine | same decision | same prediction | accuracy | causes of disagreement |",
           "| --- | ---: | ---: | ---: | --- |",
           f"| torch | | | {100 * a['accuracy']['torch']:.2f} % | |"]
    for e, d in a["engines"].items():
        causes = Counter(x["cause"] for x in d["disagreements"])
        c = "; ".join(f"{n}: {k}" for k, n in causes.items()) or "none"
        out.append(f"| {e} | {d['same_decision']:,} ({100 * d['same_decision'] / a['n']:.2f} %) | "
                   f"{d['same_prediction']:,} ({100 * d['same_prediction'] / a['n']:.2f} %) | "
                   f"{100 * a['accuracy'][e]:.2f} % | {c} |")
    sat = a["engines"].get("onnx", {}).get("saturation")
    if sat:
        out += ["", f"ONNX `QLinearConv` saturation (sums outside [-256, 254]) on the first {sat['images']} test images: "
                f"{sat['saturated_sums']:,} of {sat['binary_conv_sums']:,} binary conv sums "
                f"({sat['images_with_saturated_sums']} images affected)."]
    zmax = max((max(abs(f["z_torch"]), abs(f["z_engine"])) for d in a["engines"].values() for x in d["disagreements"]
                for f in x["first_flips"]), default=None)
    if zmax is not None:
        out += ["", f"Largest pre-sign value at a first flip: {zmax:.2g} (BatchNorm outputs are of order 1)."]
    out += ["", "Each disagreement is traced by running the torch engine and an exact emulation of the engine's "
            "arithmetic side by side on that image (the emulation reproduces the engine's features); the first "
            "binary conv input whose sign differs is listed with both pre-sign values.", ""]
    return out


def render() -> str:
    text = DOC.read_text()
    body = []
    for name, fn in (("edge_speed.json", speed_section), ("engine_agreement.json", engine_agreement_section),
                     ("edge_agreement.json", agreement_section)):
        f = ROOT / "results" / name
        if f.exists():
            body += fn(json.loads(f.read_text()))
    return splice(text, BEGIN, END, "\n".join(body), str(DOC))


if __name__ == "__main__":
    sys.exit(render_main(DOC, render, __doc__))
