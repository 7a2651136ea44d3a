"""Operation counts and energy of the registered backbones' hybrids (issue 37), from the energy model alone (hooks
on a real forward pass, Table I constants): no data, no training. Writes results/backbones-energy.json and, with
--render, the tables of docs/backbones.md between their markers.

- ``summary`` rows: the float MACs of each backbone at 224x224 and 1,000 classes (torchvision's setting: the figures
  papers quote) and, for the hybrid of ``hybridexit summary --backbone NAME --image-size 224 --edge-blocks 4
  --edge-bits 1 --exits 4``, its edge MACs per precision, edge / cloud energy and the reduction at 0 and 70 % exits.
- ``target``: the CIFAR-10 ResNet-18 recipe (recipes/c10-resnet18-b1-half.toml: resnet18_cifar, 4E+4C blocks,
  binary edge, exit after block 4 with the recipe's exit head): reduction at 60 / 70 / 80 % exits and the exit
  fraction at which it reaches 5x. Not trained here (no GPU): energy only.

    .venv/bin/python benchmarks/backbone_energy.py --render
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybridexit.model.energy import energy_report
from hybridexit.model.resnet import HybridConfig
from hybridexit.workflows.recipes import read_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "backbones-energy.json"
DOC = ROOT / "docs" / "backbones.md"
RECIPE = "recipes/c10-resnet18-b1-half.toml"
BEGIN, END = "<!-- backbone-energy:begin (benchmarks/backbone_energy.py --render) -->", "<!-- backbone-energy:end -->"
BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenetv2")


def summary_rows() -> list[dict]:
    rows = []
    for name in BACKBONES:
        fp = energy_report(HybridConfig(backbone=name, image_size=224, num_classes=1000))
        cfg = HybridConfig(backbone=name, image_size=224, edge_layers=4, edge_bits=1, exits=(4,))
        r = energy_report(cfg)
        rows.append({"backbone": name, "fp32_macs_224_1000": fp.fp32_macs, "hybrid": cfg.to_dict(),
                     "notation": cfg.notation, "edge_macs_by_bits": {str(b): m for b, m in sorted(r.edge_macs_by_bits.items())},
                     "edge_uj": r.edge_uj, "cloud_uj": r.cloud_uj, "fp32_uj": r.fp32_uj,
                     "reduction_no_exit": r.to_dict([0.0])["reduction"], "reduction_70": r.to_dict([0.7])["reduction"],
                     "command": f"hybridexit summary --backbone {name} --image-size 224 --edge-blocks 4 --edge-bits 1 "
                                "--exits 4"})
    return rows


def target_row() -> dict:
    net = read_recipe(ROOT / RECIPE)[1]
    cfg = HybridConfig(backbone="resnet18_cifar", image_size=32, num_classes=10, edge_layers=4, edge_bits=1,
                       exits=(4,), **net)
    r = energy_report(cfg)
    full, exit_only = r.exit_path_uj[0] + r.cloud_uj, r.exit_path_uj[0]
    return {"recipe": RECIPE, "config": cfg.to_dict(), "notation": cfg.notation, "fp32_macs": r.fp32_macs,
            "fp32_uj": r.fp32_uj, "edge_uj": r.edge_uj, "cloud_uj": r.cloud_uj, "exit_path_uj": r.exit_path_uj[0],
            "reduction": {f"{x:.1f}": r.to_dict([x])["reduction"] for x in (0.0, 0.6, 0.7, 0.8)},
            "exit_fraction_for_5x": (full - r.fp32_uj / 5.0) / (full - exit_only),
            "trained": False, "why": "no GPU in this project's sessions: the recipe's command is given, not run"}


def render(d: dict) -> str:
    lines = ["| backbone | float MACs, 224x224, 1,000 classes | hybrid `--edge-blocks 4 --edge-bits 1 --exits 4` | "
             "edge MACs (bits: MACs) | edge / cloud uJ | reduction, no exit / 70 % exits |",
             "| --- | ---: | --- | --- | ---: | ---: |"]
    for r in d["summary"]:
        bits = ", ".join(f"{b}: {m / 1e6:,.1f} M" for b, m in r["edge_macs_by_bits"].items())
        lines.append(f"| {r['backbone']} | {r['fp32_macs_224_1000'] / 1e9:.3f} G | {r['notation']} | {bits} | "
                     f"{r['edge_uj']:,.0f} / {r['cloud_uj']:,.0f} | {r['reduction_no_exit']:.2f}x / "
                     f"{r['reduction_70']:.2f}x |")
    t = d["target"]
    red = ", ".join(f"{100 * float(k):.0f} %: {v:.2f}x" for k, v in t["reduction"].items())
    lines += ["", f"CIFAR-10 ResNet-18 target ({t['recipe']}, {t['notation']}, float network {t['fp32_macs'] / 1e6:,.0f} M "
              f"MACs): reduction by exit fraction {red}; 5x from {100 * t['exit_fraction_for_5x']:.1f} % exits "
              f"(energy model only: not trained, {t['why']})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--render", action="store_true", help="also rewrite the tables of docs/backbones.md")
    a = p.parse_args(argv)
    d = {"command": "python benchmarks/backbone_energy.py", "summary": summary_rows(), "target": target_row()}
    RESULTS.write_text(json.dumps(d, indent=1) + "\n")
    print(render(d))
    if a.render:
        sys.path.insert(0, str(ROOT / "scripts"))
        from splice import SpliceError, splice_file

        try:
            splice_file(DOC, BEGIN, END, render(d) + "\n")
        except SpliceError as e:
            print(e, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
