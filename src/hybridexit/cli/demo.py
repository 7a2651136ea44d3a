"""``make demo``: the main job in one command.

With the runtime installed and a trained checkpoint present: a cloud server on loopback, the edge over 1,000
CIFAR-10 test images, the summary table, the server stopped. Otherwise (no checkpoint yet): the ResNet-32 20E+10C
summary, its energy report and one conditional-inference pass on a batch, in process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..model.energy import energy_report, summary_table
from ..model.hybrid import HybridNet, conditional_inference
from ..model.records import decisions_from
from ..model.resnet import HybridConfig
from .main import guarded


def offline_demo() -> None:
    cfg = HybridConfig(depth=32, num_classes=10, edge_layers=20, edge_bits=1, exits=(20,))
    report = energy_report(cfg)
    print(f"== {cfg.name}: per-layer summary ==")
    print(summary_table(report))
    print("\n== energy per image, 65 % exiting at the edge (paper: 59-65 %) ==")
    d = report.to_dict([0.65])
    print(json.dumps({k: d[k] for k in ("fp32_uj", "edge_uj", "cloud_uj", "expected_uj", "reduction")}, indent=1))
    torch.manual_seed(0)
    model = HybridNet(cfg).eval()
    edge, cloud = model.split()
    calls = []
    cloud.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    res = edge.decide(x, [0.5])
    thr = float(res.entropies[:, 0].median())
    dec = conditional_inference(edge, cloud, x, [thr])
    print(f"\n== conditional inference on a batch of 16 (untrained weights, threshold = median entropy {thr:.3f}) ==")
    print("decided at:", [d.decided_at for d in decisions_from(dec, torch.full((16,), -1), 0)])
    print(f"cloud half called {len(calls)} time(s) on {sum(calls)} of 16 samples")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybridexit.cli.demo")
    p.add_argument("--checkpoint", default="checkpoints/c10-r32-e20-b1-x20")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=1000)
    a = p.parse_args(argv)

    def run():
        if (Path(a.checkpoint) / "config.json").exists():
            try:
                from .deploy_demo import run_demo
            except ImportError:  # runtime extras not installed: the in-process demo below
                run_demo = None
            if run_demo is not None:
                run_demo(a.checkpoint, a.data_dir, a.limit)
                return
        offline_demo()
    return guarded(run, "demo")


if __name__ == "__main__":
    sys.exit(main())
