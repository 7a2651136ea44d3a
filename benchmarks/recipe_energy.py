"""Energy cost of each binary-edge recipe option (docs/recipes.md) on CIFAR-10 ResNet-32 20E+10C, one exit at 20.

Computed by the energy model (``energy_report``, Table I constants) from the modules each option builds; no data,
no training. Writes results/recipe-energy.json and, with --render, the table of docs/recipes.md between its markers.

    .venv/bin/python benchmarks/recipe_energy.py --render
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
RESULTS = ROOT / "results" / "recipe-energy.json"
DOC = ROOT / "docs" / "recipes.md"
RECIPE = "recipes/c10-e20-b1-reactnet.toml"
BEGIN, END = "<!-- recipe-energy:begin (benchmarks/recipe_energy.py --render) -->", "<!-- recipe-energy:end -->"
BASE = dict(depth=32, num_classes=10, edge_layers=20, edge_bits=1, exits=(20,))
EXIT_RATES = (0.6, 0.7)  # issue 21's floor and goal exit fractions
VARIANTS = [("paper (plain XNOR, k3, one linear)", {}), ("act_shift = true", {"act_shift": True}),
            ("rprelu = true", {"rprelu": True}), ('ste = "approx"', {"ste": "approx"}),
            ("exit_hidden = 128", {"exit_hidden": 128}), ("exit_hidden = 256", {"exit_hidden": 256}),
            ('exit_pool = "k2"', {"exit_pool": "k2"}), ('exit_pool = "k4"', {"exit_pool": "k4"}),
            ('exit_pool = "global"', {"exit_pool": "global"})]


def exits_for(r, reduction: float) -> float:
    """The exit fraction at which the expected energy is fp32 / ``reduction`` (one exit)."""
    full, exit_only = r.exit_path_uj[0] + r.cloud_uj, r.exit_path_uj[0]
    return (full - r.fp32_uj / reduction) / (full - exit_only)


def rows() -> list[dict]:
    variants = VARIANTS + [(RECIPE, read_recipe(ROOT / RECIPE)[1])]
    plain = energy_report(HybridConfig(**BASE))
    out = []
    for name, options in variants:
        r = energy_report(HybridConfig(**BASE, **options))
        out.append({"variant": name, "options": options, "exit_path_uj": r.exit_path_uj[0], "cloud_uj": r.cloud_uj,
                    "added_uj": r.exit_path_uj[0] - plain.exit_path_uj[0], "fp32_uj": r.fp32_uj,
                    "reduction": {str(e): r.to_dict([e])["reduction"] for e in EXIT_RATES},
                    "exits_for_6x": exits_for(r, 6.0)})
    return out


def render(data: dict) -> str:
    lines = ["| variant | edge + exit, uJ/image | added, uJ | reduction at 60 % exits | at 70 % exits "
             "| exits needed for 6x |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        red = r["reduction"]
        lines.append(f"| `{r['variant']}` | {r['exit_path_uj']:.2f} | {r['added_uj']:+.2f} | {red['0.6']:.2f}x "
                     f"| {red['0.7']:.2f}x | {100 * r['exits_for_6x']:.1f} % |")
    cloud, fp32 = {r["cloud_uj"] for r in data["rows"]}, {r["fp32_uj"] for r in data["rows"]}
    lines.append(f"\nThe cloud half costs {', '.join(f'{c:.2f}' for c in sorted(cloud))} uJ per image with every "
                 f"option; the FP32 network {', '.join(f'{f:.2f}' for f in sorted(fp32))} uJ.")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render", action="store_true", help="also rewrite the table in docs/recipes.md")
    a = p.parse_args()
    data = {"network": "CIFAR-10 ResNet-32, 20E+10C binary, one exit at layer 20", "energy_table": "Table I",
            "rows": rows()}
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(RESULTS)
    if a.render:
        sys.path.insert(0, str(ROOT / "scripts"))
        from splice import splice_file

        splice_file(DOC, BEGIN, END, render(data))
        print(DOC)


if __name__ == "__main__":
    main()
