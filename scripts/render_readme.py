#!/usr/bin/env python3
"""Regenerate the README sections between <!-- BEGIN name --> and <!-- END name --> markers.

Every figure comes from results/*.json or from the library itself; nothing is typed by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hybridexit.energy import energy_report, summary_table  # noqa: E402
from hybridexit.resnet import HybridConfig  # noqa: E402


def _load(name):
    p = ROOT / "results" / name
    return json.loads(p.read_text()) if p.exists() else None


def section_summary() -> str:
    r = energy_report(HybridConfig(depth=32, num_classes=10, edge_layers=20, edge_bits=1, exits=(20,)))
    d = r.to_dict([0.65])
    return ("```\n" + summary_table(r) + "\n```\n\n"
            f"With 65 % of images exiting at layer 20: edge {d['edge_uj']:.1f} uJ, cloud {d['cloud_uj']:.1f} uJ "
            f"(paid by the 35 % that go on), expected {d['expected_uj']:.1f} uJ per image against "
            f"{d['fp32_uj']:.1f} uJ for the FP32 network: {d['reduction']:.2f}x less computational energy "
            f"(`hybridexit energy --edge-layers 20 --edge-bits 1 --exits 20 --exit-rate 0.65`).\n")


def _pct(x):
    return "" if x is None else f"{100 * x:.2f}"


def section_results(dataset: str) -> str:
    data = _load(f"{dataset}.json")
    if not data:
        return (f"_No results yet: run `python benchmarks/cifar.py --dataset {dataset}` "
                f"(writes results/{dataset}.json)._\n")
    rows = ["| model | training | thresholds | test accuracy % | final classifier alone % | exits at edge % | "
            "expected uJ/image | reduction | paper |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in data["points"]:
        thr = ", ".join(f"{t:.3f}" for t in p["thresholds"]) or "-"
        rows.append(f"| `{p['name']}` | {p.get('training', '')} | {thr} | {_pct(p['accuracy'])} | "
                    f"{_pct(p.get('cloud_accuracy'))} | {_pct(p['edge_fraction'])} | {p['expected_uj']:.1f} | "
                    f"{p['reduction']:.2f}x | {p.get('paper', '')} |")
    return ("\n".join(rows) + "\n\n" + data.get("note", "") + "\n" + _against_targets(dataset, data["points"])
            + _table2(dataset, data["points"]))


# the CIFAR-10 targets of issue 3 (and the paper's headline): the float baseline and the 20E+10C binary hybrid
TARGETS = {"cifar10": {"fp32": "c10-r32-fp32", "hybrid": "c10-r32-e20-b1-x20", "fp32_min": 0.90,
                       "exits_min": 0.60, "reduction_min": 5.5, "max_drop": 0.03}}


def _against_targets(dataset: str, points: list[dict]) -> str:
    t = TARGETS.get(dataset)
    by_name = {p["name"]: p for p in points}
    if not t or t["fp32"] not in by_name or t["hybrid"] not in by_name:
        return ""
    fp = by_name[t["fp32"]]

    def mark(ok):
        return "met" if ok else "**missed**"

    def judged(hy):
        drop = fp["accuracy"] - hy["accuracy"]
        return (f"exits {_pct(hy['edge_fraction'])} % (at least {100 * t['exits_min']:.0f} %: "
                f"{mark(hy['edge_fraction'] >= t['exits_min'])}), {hy['reduction']:.2f}x less energy (at least "
                f"{t['reduction_min']}x: {mark(hy['reduction'] >= t['reduction_min'])}), {100 * drop:.2f} points "
                f"below FP32 (at most {100 * t['max_drop']:.0f}: {mark(drop <= t['max_drop'] + 1e-9)})")

    text = (f"\nAgainst the targets: FP32 {_pct(fp['accuracy'])} % (at least {100 * t['fp32_min']:.0f} %: "
            f"{mark(fp['accuracy'] >= t['fp32_min'])}); `{t['hybrid']}` at its calibrated threshold: "
            f"{judged(by_name[t['hybrid']])}.")
    for p in points:  # the same network at the exit target, when its calibration took the accuracy-floor branch
        if p["point"] == "exit target" and Path(p["checkpoint"]).name == t["hybrid"]:
            text += f" At the exit target (row `{p['name']}`): {judged(p)}."
    return text + "\n"


# the paper's Table II: the same 16E+14C binary network (exit at 16) trained jointly and separately
TABLE2 = {"cifar10": ("c10-r32-e16-b1-x16-joint", "c10-r32-e16-b1-x16-separate",
                      "c10-r32-e16-b1-x16-separate-6exitep")}


def _table2(dataset: str, points: list[dict]) -> str:
    by_name = {p["name"]: p for p in points}
    # each checkpoint's row evaluated at the paper's fixed threshold
    fixed = {Path(p["checkpoint"]).name: p for p in points if p["point"] == "paper threshold"}
    names = [n for n in TABLE2.get(dataset, ()) if n in by_name and n in fixed]
    if len(names) < 2:
        return ""

    def at(p):
        return f"{_pct(p['accuracy'])} % with {_pct(p['edge_fraction'])} % exits"

    thr = ", ".join(f"{t:g}" for t in fixed[names[0]]["thresholds"])
    rows = [f"`{n}` ({by_name[n]['training']}): {at(fixed[n])} at the paper's threshold {thr}, {at(by_name[n])} at "
            f"the calibrated one, final classifier alone {_pct(by_name[n]['cloud_accuracy'])} %" for n in names]
    # the paper's figures; a "(...)" entry only says how a point relates to another one of ours
    papers = "; ".join(p for p in (by_name[n]["paper"] for n in names) if p and not p.startswith("("))
    return (f"\nTable II, 16E+14C binary with its exit at 16, joint vs separate optimization (paper: {papers}):\n\n"
            + "".join(f"- {r}\n" for r in rows))


def section_train_speed() -> str:
    data = _load("train_speed.json")
    if not data:
        return "_No measurement yet: run `python benchmarks/train_speed.py`._\n"
    rows = ["| network | images/s | step ms | relative to FP32 |", "| --- | --- | --- | --- |"]
    for r in data["runs"]:
        rows.append(f"| {r['name']} | {r['images_per_s']:.0f} | {r['step_ms']:.0f} | {r['relative_step']:.2f}x |")
    return "\n".join(rows) + f"\n\n{data.get('machine', '')}\n"


def section_runtime() -> str:
    d = _load("runtime.json")
    if not d:
        return "_No measurement yet: run `python benchmarks/runtime.py` (writes results/runtime.json)._\n"
    ip = d["in_process"]
    out = [f"`{d['model']}` over HTTP on loopback, {d['dataset']}, edge batch size {d['edge_batch_size']}; "
           f"in process: accuracy {100 * ip['accuracy']:.2f} %, {100 * ip['edge_fraction']:.1f} % decided at the edge.",
           "", "| codec | zstd | bytes per offloaded sample | vs raw image (3,072 B) | accuracy % | change (points) |"
           " offloaded p50 / p95 ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in d["codecs"]:
        out.append(f"| {c['codec']} | {'yes' if c['compressed'] else 'no'} | {c['payload_bytes_per_offloaded']:,.0f} | "
                   f"{c['offloaded_vs_raw_image']:.2f}x | {100 * c['accuracy']:.2f} | {c['accuracy_change_points']:+.2f} | "
                   f"{c['latency_ms_offloaded_p50']:.1f} / {c['latency_ms_offloaded_p95']:.1f} |")
    out += ["", "| clients | inputs/s | edge-decided p50 / p95 ms | offloaded p50 / p95 ms | server batch sizes seen |"
            " failed requests |", "| --- | --- | --- | --- | --- | --- |"]
    for c in d["concurrency"]:
        sizes = ", ".join(f"{k}: {v}" for k, v in c["server_batch_samples_seen"].items())
        out.append(f"| {c['clients']} | {c['throughput_per_s']:.1f} | {c['latency_ms_edge_p50']:.1f} / "
                   f"{c['latency_ms_edge_p95']:.1f} | {c['latency_ms_offloaded_p50']:.1f} / "
                   f"{c['latency_ms_offloaded_p95']:.1f} | {sizes} | {c['failed_requests']} |")
    checks = ", ".join(f"{k}: {v}" for k, v in d.get("checks", {}).items())
    out += ["", f"Checks: {checks}.", "",
            "Edge and cloud share this 2-core machine, so latency and throughput describe this machine; bytes, "
            "accuracy and batching carry over. At the 20E split the edge sends 32x16x16 features, more bytes than the "
            "raw image even in int8: the saving is the samples that never leave the device and the edge energy, "
            "not bandwidth (see docs/wire-format.md)."]
    return "\n".join(out) + "\n"


SECTIONS = {"summary": section_summary, "cifar10": lambda: section_results("cifar10"),
            "cifar100": lambda: section_results("cifar100"), "train_speed": section_train_speed,
            "runtime": section_runtime}


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, fn in SECTIONS.items():
        pat = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if pat.search(text):
            text = pat.sub(lambda m, fn=fn: m.group(1) + fn() + m.group(2), text)
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
