"""Edge speed benchmark -> results/edge_speed.json (and one JSON object on stdout).

    python benchmarks/edge_speed.py [--checkpoint checkpoints/c10-r32-e20-b1-x20-xnor] [--fp32 checkpoints/c10-r32-fp32]
                                    [--data-dir data] [--images 256] [--rounds 5] [--out results/edge_speed.json]

One thread, all variants in the same run on the same first ``--images`` CIFAR-10 test images (raw uint8), batch 1
(image by image) and batch 64. Variants are timed round-robin, ``--rounds`` times each, and each reports its
fastest round (the least disturbed by other processes on a shared machine):
- ``fp32``: the FP32 ResNet-32 in PyTorch;
- ``hybrid[engine]``: Algorithm 1 with the edge half on the engine and the cloud half in PyTorch on the samples
  that do not exit, at the checkpoint's exit policy (its calibrated thresholds);
- ``edge[engine]``: the edge half alone (normalize, stem and every edge block on every sample, no exits) per
  engine, against ``edge[float]``: the same layers in float (the FP32 checkpoint's stem and first blocks).
Engines: torch (the binary EdgeNet as trained: float convolutions on +-1 values), packed, onnx (if installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from hybridexit.checkpoint import load_model
from hybridexit.data import get_split, load_cifar
from hybridexit.engines import available_engines, get_engine
from hybridexit.hybrid import HybridNet, conditional_inference


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def float_edge(fp32_model, cfg):
    """The FP32 network's stem and first ``cfg.edge_blocks`` blocks (the same layers as the edge, in float)."""
    net = HybridNet(fp32_model.cfg.replace(edge_layers=cfg.edge_layers)).eval()
    net.load_state_dict(fp32_model.state_dict(), strict=False)
    return net.split()[0]


def timed_rounds(variants: dict, batches: list, rounds: int) -> dict[str, float]:
    """Fastest wall time (s) of one pass over ``batches`` per variant, variants interleaved round by round."""
    best = dict.fromkeys(variants, float("inf"))
    with torch.no_grad():
        for fn in variants.values():  # warm-up (first-call allocations, kernel builds)
            fn(batches[0])
        for _ in range(rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                for x in batches:
                    fn(x)
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def artifact_sizes(engines: dict, edge, fedge) -> dict[str, int]:
    sizes = {}
    with tempfile.TemporaryDirectory() as d:
        for name, module in (("float", fedge), ("torch", edge)):
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, f"{d}/{name}.safetensors")
            sizes[name] = os.path.getsize(f"{d}/{name}.safetensors")
        for name, eng in engines.items():
            if hasattr(eng, "save"):
                eng.save(f"{d}/{name}.artifact")
                sizes[name] = os.path.getsize(f"{d}/{name}.artifact")
    return sizes


def agreement(engines: dict, cloud, images, thr, temps) -> dict:
    ref = conditional_inference(engines["torch"], cloud, images, thr, temps)
    out = {"exit_fraction": float((ref.decided_at >= 0).float().mean())}
    for name, eng in engines.items():
        d = conditional_inference(eng, cloud, images, thr, temps)
        out[name] = {"same_decision": int((d.decided_at == ref.decided_at).sum()),
                     "same_prediction": int((d.predictions == ref.predictions).sum())}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/c10-r32-e20-b1-x20-xnor")
    p.add_argument("--fp32", default="checkpoints/c10-r32-fp32")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="results/edge_speed.json")
    p.add_argument("--note", default="", help="how the machine was shared during the run (stored with the results)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, meta = load_model(a.checkpoint)
    fp32, _ = load_model(a.fp32)
    policy = meta["policy"]
    thr, temps = policy.thresholds, (policy.temperatures or None)
    edge, cloud = model.split()
    fedge = float_edge(fp32, model.cfg)
    engines = {name: get_engine(name, edge) for name in available_engines(model.cfg)}
    images = get_split(load_cifar("cifar10", a.data_dir), "test").images[: a.images]
    sets = {"b1": [images[i: i + 1] for i in range(len(images))], "b64": list(images.split(64))}

    variants = {"fp32": fp32, "edge[float]": fedge}
    for name, eng in engines.items():
        variants[f"hybrid[{name}]"] = lambda x, e=eng: conditional_inference(e, cloud, x, thr, temps)
        variants[f"edge[{name}]"] = edge if name == "torch" else eng.forward
    times = {b: timed_rounds(variants, xs, a.rounds) for b, xs in sets.items()}
    ips = {b: {k: len(images) / t for k, t in ts.items()} for b, ts in times.items()}

    def per(prefix):
        return {name: {b: round(ips[b][f"{prefix}[{name}]"], 1) for b in sets} for name in engines}

    hybrid = per("hybrid")
    best = max(engines, key=lambda n: hybrid[n]["b1"])
    result = {
        "checkpoint": a.checkpoint, "fp32_checkpoint": a.fp32, "images": len(images), "threads": 1,
        "rounds": a.rounds, "thresholds": list(thr),
        "fp32_img_s": {b: round(ips[b]["fp32"], 1) for b in sets},
        "hybrid_img_s": hybrid,
        "edge_img_s": {"float": {b: round(ips[b]["edge[float]"], 1) for b in sets}, **per("edge")},
        "engine": best,
        "speedup": round(ips["b1"][f"hybrid[{best}]"] / ips["b1"]["fp32"], 2),
        "hybrid_speedup": {n: {b: round(ips[b][f"hybrid[{n}]"] / ips[b]["fp32"], 2) for b in sets} for n in engines},
        "edge_half_speedup": {n: {b: round(ips[b][f"edge[{n}]"] / ips[b]["edge[float]"], 2) for b in sets}
                              for n in engines},
        "edge_bytes": artifact_sizes(engines, edge, fedge),
        "agreement": agreement(engines, cloud, images, thr, temps),
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical CPUs",
        "note": a.note,
        "isa": {n: e.isa_name for n, e in engines.items() if hasattr(e, "isa_name")},
        "torch": torch.__version__,
        "command": "python benchmarks/edge_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
