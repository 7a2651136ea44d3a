#!/usr/bin/env python3
"""Training throughput of ResNet-32 on this machine: FP32 vs 20E+10C binary (one exit at 20), in one run.

Measures full training steps (augmentation excluded: random data) at the training settings of the project
(batch 128, channels-last, SGD with Nesterov momentum), interleaving the two networks so that both see the
same machine state. Also profiles where the extra time of the binary step goes. Writes results/train_speed.json.

    python benchmarks/train_speed.py [--steps 12] [--batch-size 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridexit import HybridConfig, HybridNet

CONFIGS = {"fp32 ResNet-32": HybridConfig(depth=32),
           "20E+10C binary, exit at 20": HybridConfig(depth=32, edge_layers=20, edge_bits=1, exits=(20,))}


def make_step(cfg, bs):
    torch.manual_seed(0)
    m = HybridNet(cfg).train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(bs, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,))
    w = [0.6, 0.4] if cfg.exits else [1.0]

    def step():
        outs = m(x)
        loss = sum(wi * F.cross_entropy(o, y) for wi, o in zip(w, outs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def profile_top(step, n=3, top=8):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / n,
             "share": e.self_cpu_time_total / total} for e in rows]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="results/train_speed.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    steps = {name: make_step(cfg, a.batch_size) for name, cfg in CONFIGS.items()}
    for s in steps.values():  # warm-up
        s()
        s()
    times = {name: [] for name in steps}
    for _ in range(a.steps):  # interleaved
        for name, s in steps.items():
            t = time.perf_counter()
            s()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["fp32 ResNet-32"])
    runs = []
    for name, ts in times.items():
        med = statistics.median(ts)
        runs.append({"name": name, "step_ms": 1000 * med, "images_per_s": a.batch_size / med,
                     "relative_step": med / base, "steps": len(ts)})
    result = {"batch_size": a.batch_size, "threads": a.threads, "torch": torch.__version__,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}, {a.threads} threads, batch {a.batch_size}, channels-last",
              "runs": runs,
              "profile_binary": profile_top(steps["20E+10C binary, exit at 20"]),
              "profile_fp32": profile_top(steps["fp32 ResNet-32"])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"{r['name']:<30}{r['images_per_s']:8.0f} img/s {r['step_ms']:8.0f} ms/step {r['relative_step']:6.2f}x")


if __name__ == "__main__":
    main()
