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


def section_cifar10() -> str:
    data = _load("cifar10.json")
    if not data:
        return "_No results yet: run `python benchmarks/cifar10.py` (writes results/cifar10.json)._\n"
    rows = ["| model | training | thresholds | test accuracy % | final classifier alone % | exits at edge % | "
            "expected uJ/image | reduction | paper |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in data["points"]:
        thr = ", ".join(f"{t:.3f}" for t in p["thresholds"]) or "-"
        rows.append(f"| `{p['name']}` | {p.get('training', '')} | {thr} | {_pct(p['accuracy'])} | "
                    f"{_pct(p.get('cloud_accuracy'))} | {_pct(p['edge_fraction'])} | {p['expected_uj']:.1f} | "
                    f"{p['reduction']:.2f}x | {p.get('paper', '')} |")
    return "\n".join(rows) + "\n\n" + data.get("note", "") + "\n"


def section_train_speed() -> str:
    data = _load("train_speed.json")
    if not data:
        return "_No measurement yet: run `python benchmarks/train_speed.py`._\n"
    rows = ["| network | images/s | step ms | relative to FP32 |", "| --- | --- | --- | --- |"]
    for r in data["runs"]:
        rows.append(f"| {r['name']} | {r['images_per_s']:.0f} | {r['step_ms']:.0f} | {r['relative_step']:.2f}x |")
    return "\n".join(rows) + f"\n\n{data.get('machine', '')}\n"


def section_runtime() -> str:
    data = _load("runtime.json")
    if not data:
        return "_No measurement yet: run `python benchmarks/runtime.py` (writes results/runtime.json)._\n"
    try:
        from benchmarks_runtime_render import render  # optional hook written by the runtime benchmark
    except ImportError:
        render = None
    if render:
        return render(data)
    return "```json\n" + json.dumps(data, indent=1)[:3000] + "\n```\n"


SECTIONS = {"summary": section_summary, "cifar10": section_cifar10, "train_speed": section_train_speed,
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
