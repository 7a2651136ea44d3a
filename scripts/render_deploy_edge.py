"""Render the figures of docs/deploy.md's "The edge on a device" from results/edge_package.json.

    python scripts/render_deploy_edge.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splice import between, splice_file

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"
RESULT = ROOT / "results" / "edge_package.json"
BEGIN, END = "<!-- edge-package:figures -->", "<!-- /edge-package:figures -->"


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB"


def figures(r: dict) -> list[str]:
    v, t, c, a = r["venv_bytes"], r["targets"], r["cold_start_s"], r["agreement"]
    edge, full = v["hybridexit-edge"], v["full project (.venv)"]
    thr = r["throughput"]["images_per_s"]
    e, m = thr["hybridexit-edge"], thr["main package, packed engine"]
    ratio = r["throughput"]["ratio_edge_over_main"]
    ok = lambda b: "met" if b else "missed"  # noqa: E731
    rows = [
        "| | hybridexit-edge | full project | target |",
        "|---|---|---|---|",
        f"| venv, every file | {_mb(edge['venv'])} | {_mb(full['venv'])} | at most {_mb(t['venv_bytes_max'])} "
        f"({ok(r['meets']['venv_at_most_60MB'])}), goal {_mb(t['venv_bytes_goal'])} "
        f"({ok(r['meets']['venv_goal_30MB'])}) |",
        f"| site-packages without pip, setuptools | {_mb(edge['site_packages_without_pip'])} | "
        f"{_mb(full['site_packages_without_pip'])} | |",
        f"| cold start (process, import, load, first decision), median of {len(c['hybridexit-edge']['runs'])} | "
        f"{c['hybridexit-edge']['median']:.2f} s | {c['main package, packed engine']['median']:.2f} s | at most "
        f"{t['cold_start_s_max']} s ({ok(r['meets']['cold_start_at_most_0.5s'])}) |",
    ]
    for bs in ("batch 1", "batch 100"):
        rows.append(f"| edge decisions per second, {bs}, one thread (best of {r['throughput']['rounds']}) | "
                    f"{e[bs]['best']:.0f} | {m[bs]['best']:.0f} (packed engine) | within 10 %: "
                    f"{ratio[bs]:.2f}x ({ok(ratio[bs] >= t['throughput_ratio_min'])}) |")
    n = a["images"]
    agree = (f"On the {n:,} CIFAR-10 test images at the checkpoint's exit policy, hybridexit-edge and the packed "
             f"engine of `hybridexit edge --engine packed` agree on {a['decisions_equal']:,} exit decisions and "
             f"{a['predictions_equal']:,} predictions, the entropies are "
             f"{'bit-identical' if a['entropies_bit_equal'] else 'not bit-identical'} and the features of the "
             f"{a['offloaded']:,} offloaded images are "
             f"{'byte-identical' if a['offloaded_features_sha256_equal'] else 'NOT byte-identical'}.")
    mach = r["machine"]
    return [f"Measured by `{r['command'].strip()}` ({r['checkpoint']}, weights SHA-256 "
            f"{r['weights_sha256'][:12]}..., artifact {r['artifact_bytes']:,} B, native library "
            f"{r['library_bytes']:,} B) on {mach['cpu']}, kernels {mach['isa']}; a shared machine, load average "
            f"{mach['load_average_1min'][0]} before and {mach['load_average_1min'][1]} after, the two sides "
            "alternating in the same run:", "", *rows, "", agree, "",
            "The aarch64 build is checked for correctness only (qemu-user); its speed is unmeasured until it runs on "
            "real ARM hardware."]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="exit 1 if docs/deploy.md is not the rendering")
    body = "\n".join(figures(json.loads(RESULT.read_text())))
    if p.parse_args().check:
        return int(between(DOC.read_text(), BEGIN, END, str(DOC)).strip() != body.strip())
    splice_file(DOC, BEGIN, END, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
