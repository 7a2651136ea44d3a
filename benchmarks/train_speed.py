#!/usr/bin/env python3
"""Training throughput of ResNet-32 on this machine: FP32 vs 20E+10C binary (one exit at 20), in one run.

Measures full training steps (augmentation excluded: random data) at the training settings of the project
(batch 128, channels-last, SGD with Nesterov momentum), interleaving the two networks so that both see the
same machine state. Also profiles where the extra time of the binary step goes. Writes results/train_speed.json.

    python benchmarks/train_speed.py [--steps 12] [--batch-size 128] [--threads 2]

``--epochs`` (issue 40) measures seconds per training epoch (45,000 images, then the 5,000-image validation pass)
through ``hybridexit.workflows.train.train`` itself, for FP32 ResNet-32 (recipes/fp32-long.toml) and the headline
binary recipe's binary-weight stage (recipes/c10-e20-b1-reactnet.toml: 20E+10C with its options, Adam, distillation
from the FP32 teacher), on the host path, the device-resident path (``device_data``) and with bf16 autocast, each
row naming its device. It trains two epochs of ``--epoch-steps`` steps on random uint8 images and takes the second;
below a full epoch the row is extrapolated (``extrapolated_from_steps``: steps x 352 / measured + the validation
pass, timed apart). ``--concurrent N`` runs N such trainings at once on the device (one process each) and records
their aggregate throughput beside one run's. Rows are merged into the ``epochs`` list of results/train_speed.json
(keyed by network, path, device and concurrency); the step rows above are kept.

    python benchmarks/train_speed.py --epochs --device cpu --threads 1 --epoch-steps 12
    python3 benchmarks/train_speed.py --epochs --device cuda --epoch-steps 352 --concurrent 1 4     (a GPU window)
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

ROOT = Path(__file__).resolve().parents[1]
EPOCH_IMAGES, VAL_IMAGES = 45_000, 5_000
EPOCH_NETS = {  # name: (recipe, network fields beside the recipe's own options, recipe fields replaced)
    "fp32 ResNet-32": ("recipes/fp32-long.toml", {}, {}),
    "headline 20E+10C binary (ReActNet recipe, stage 2)": (
        "recipes/c10-e20-b1-reactnet.toml", {"edge_layers": 20, "edge_bits": 1, "exits": (20,)}, {"stage1_epochs": 0}),
}
PATHS = {"host": {"device_data": False, "bf16": False}, "device_data": {"device_data": True, "bf16": False},
         "device_data+bf16": {"device_data": True, "bf16": True}}

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


def _synthetic(n_train: int, n_val: int):
    """Random uint8 CIFAR-10-shaped data (throughput does not depend on the pixels)."""
    from hybridexit.data import Dataset, Split

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_train + n_val, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_train + n_val,), generator=g)
    test = Split(images[:16], labels[:16], "test")
    return Dataset("cifar10", Split(images, labels, "train"), test, [str(i) for i in range(10)],
                   (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), f"synthetic-{n_train + n_val}", "synthetic")


def _configs(name: str, path: str, steps: int, batch: int):
    from hybridexit.workflows.recipes import read_recipe
    from hybridexit.workflows.train import TrainConfig

    recipe, net_fields, replaced = EPOCH_NETS[name]
    train_kw, network = read_recipe(ROOT / recipe)
    for k in ("init", "teacher"):
        if train_kw.get(k):
            train_kw[k] = str(ROOT / train_kw[k])
    tcfg = TrainConfig(**dict(train_kw, **replaced, **PATHS[path], epochs=2, batch_size=batch, val_size=256,
                              warmup_epochs=0.0, limit_train=steps * batch))
    return HybridConfig(depth=32, **net_fields, **network), tcfg


def epoch_seconds(job: dict) -> dict:
    """One training run of two epochs (the second timed) on ``job['device']``; in a worker process for --concurrent."""
    import tempfile

    from hybridexit.data import Split
    from hybridexit.workflows.evaluate import evaluate_outputs
    from hybridexit.workflows.train import train

    torch.set_num_threads(job["threads"])
    net, tcfg = _configs(job["name"], job["path"], job["steps"], job["batch"])
    ds = _synthetic(job["steps"] * job["batch"], 256)
    if "start" in job:  # --concurrent: every run starts its epochs together
        job["start"].wait()
    with tempfile.TemporaryDirectory() as tmp:
        meta = train(Path(tmp) / "run", net, tcfg, ds, device=job["device"], progress=False)
        hist = json.loads((Path(tmp) / "run" / "train_state.json").read_text())["history"]
    epoch = hist[-1]["epoch_s"]
    model = HybridNet(net.replace(mean=tuple(ds.mean), std=tuple(ds.std))).to(job["device"])

    t = time.perf_counter()
    evaluate_outputs(model, Split(ds.train.images[:VAL_IMAGES], ds.train.labels[:VAL_IMAGES]), device=job["device"])
    val_5k = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_outputs(model, Split(ds.train.images[:256], ds.train.labels[:256]), device=job["device"])
    val_small = time.perf_counter() - t
    full_steps = -(-EPOCH_IMAGES // job["batch"])
    train_s = max(epoch - val_small, 1e-9) * full_steps / job["steps"]
    return {"epoch_s_45k": train_s + val_5k, "train_s_45k": train_s, "val_s_5k": val_5k,
            "measured_epoch_s": epoch, "device": str(meta["device"])}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def epochs_main(a) -> list[dict]:
    """The --epochs rows: every network x path, at each --concurrent N."""
    import multiprocessing

    rows = []
    for name in EPOCH_NETS:
        for path in a.paths:
            single = None
            for n in a.concurrent:
                job = {"name": name, "path": path, "steps": a.epoch_steps, "batch": a.batch_size,
                       "device": a.device, "threads": a.threads}
                if n == 1:
                    res = [epoch_seconds(job)]
                else:
                    ctx = multiprocessing.get_context("spawn")
                    with ctx.Manager() as mgr, ctx.Pool(n) as pool:
                        res = pool.map(epoch_seconds, [dict(job, start=mgr.Barrier(n))] * n)
                per_run = statistics.mean(r["epoch_s_45k"] for r in res)
                agg = n * EPOCH_IMAGES / per_run
                row = {"name": name, "recipe": EPOCH_NETS[name][0], "path": path, "device": a.device,
                       "device_name": _device_name(a.device), "threads": a.threads, "concurrent": n,
                       "epoch_s_45k": round(per_run, 2), "train_s_45k": round(statistics.mean(r["train_s_45k"] for r in res), 2),
                       "val_s_5k": round(statistics.mean(r["val_s_5k"] for r in res), 2),
                       "aggregate_images_per_s": round(agg, 1), "steps_measured": a.epoch_steps,
                       "extrapolated_from_steps": a.epoch_steps < -(-EPOCH_IMAGES // a.batch_size),
                       "batch_size": a.batch_size, "torch": torch.__version__, "load": a.load,
                       "command": "python benchmarks/train_speed.py " + " ".join(a.argv)}
                if n == 1:
                    single = agg
                elif single:
                    row["throughput_vs_one"] = round(agg / single, 2)
                rows.append(row)
                print(f"{name:<52}{path:<18}x{n} {a.device:<6}{per_run:9.1f} s/epoch {agg:8.0f} img/s", flush=True)
    return rows


def _merge(out: Path, rows: list[dict]) -> None:
    data = json.loads(out.read_text()) if out.exists() else {}
    key = lambda r: (r["name"], r["path"], r["device_name"], r["concurrent"])  # noqa: E731
    kept = {key(r): r for r in data.get("epochs", [])}
    kept.update({key(r): r for r in rows})
    data["epochs"] = list(kept.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")


def main():
    import sys

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="results/train_speed.json")
    p.add_argument("--epochs", action="store_true", help="seconds per epoch through train() (issue 40)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epoch-steps", type=int, default=12, help="steps per measured epoch (352 = a full epoch)")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--concurrent", type=int, nargs="+", default=[1], help="runs at once on the device")
    p.add_argument("--load", default="", help="what else ran on the machine meanwhile (recorded)")
    a = p.parse_args()
    a.argv = sys.argv[1:]
    torch.set_num_threads(a.threads)
    if a.epochs:
        _merge(Path(a.out), epochs_main(a))
        return
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
    if Path(a.out).exists():  # the --epochs rows stay
        result["epochs"] = json.loads(Path(a.out).read_text()).get("epochs", [])
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"{r['name']:<30}{r['images_per_s']:8.0f} img/s {r['step_ms']:8.0f} ms/step {r['relative_step']:6.2f}x")


if __name__ == "__main__":
    main()
