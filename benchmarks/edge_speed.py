"""Edge speed benchmark -> results/edge_speed.json (and one JSON object on stdout).

    python benchmarks/edge_speed.py [--checkpoint CKPT ...] [--fp32 FP32_CKPT] [--data-dir data] [--images 256]
                                    [--rounds 5] [--out results/edge_speed.json]

By default both headlines, each on the first ``--images`` test images of its own dataset (raw uint8) and against
the FP32 ResNet-32 of that dataset (``FP32_OF``; ``--fp32`` overrides it for every checkpoint). One thread; all
variants of a checkpoint in the same run, batch 1 (image by image) and batch 64, timed round-robin ``--rounds``
times each, each reporting its fastest round (the least disturbed by other processes on a shared machine):
- ``fp32``: the FP32 ResNet-32 in PyTorch;
- ``hybrid[engine]``: Algorithm 1 with the edge half on the engine and the cloud half in PyTorch on the samples
  that do not exit, at the checkpoint's exit policy (its calibrated thresholds);
- ``decide[engine]``: the edge decision alone (exits included, no cloud);
- ``edge[engine]``: the edge half alone (normalize, stem and every edge block on every sample, no exits) per
  engine, against ``edge[float]``: the same layers in float (the FP32 checkpoint's stem and first blocks);
- ``cloud``: the cloud half on one offloaded sample's features (batch 1) or 64 (batch 64).
With ONNX Runtime installed, the float parts in their fastest engine too (PyTorch's per-operation overhead
dominates a float network at batch 1): ``fp32[onnx]``, the FP32 ResNet-32 as ONNX graphs (normalize and stem, then
the blocks and head), and ``hybrid[E, cloud onnx]``, the hybrid with the best edge engine E and the cloud half as
the float ONNX graph; ``speedup_onnx`` is their ratio, the hybrid against FP32 with both in their fastest engines.
What limits the hybrid's ratio is read from the last two: per image, the edge decision costs ``decide`` and the
cloud ``(1 - exit fraction) x cloud``. Engines: every engine that can run the checkpoint here (torch: the quantized
EdgeNet as trained, float convolutions on quantized values; packed; onnx if installed); ``auto`` names the one
``--engine auto`` picks.
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

from hybridexit.data import get_split, load_cifar
from hybridexit.engines import available_engines, get_engine
from hybridexit.model.checkpoint import load_model
from hybridexit.model.hybrid import HybridNet, conditional_inference


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The SIMD extensions that matter to the kernels (AVX2 only, or AVX-512 and which parts)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.machine()
    keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_vpopcntdq", "avx_vnni")
    return " ".join(f for f in keep if f in flags) or "no AVX2"


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


def onnx_float_variants(variants: dict, engines: dict, edge_best: str, fp32, cloud, thr, temps):
    """Adds ``fp32[onnx]`` and ``hybrid[<edge_best>, cloud onnx]`` to ``variants`` when ONNX Runtime is here;
    returns the cloud half's ONNX session (None without ONNX Runtime)."""
    if "onnx" not in engines:
        return None
    from hybridexit.engines.onnx_engine import OnnxCloud, OnnxEdge

    fe, fc = (m.eval() for m in fp32.split())
    fstart, frest, ocloud = OnnxEdge.from_edge(fe), OnnxCloud(fc), OnnxCloud(cloud)
    variants["fp32[onnx]"] = lambda x: frest(fstart.run(x)["features"])
    variants[f"hybrid[{edge_best}, cloud onnx]"] = lambda x, e=engines[edge_best]: conditional_inference(
        e, ocloud, x, thr, temps)
    return ocloud


def onnx_float_figures(ips: dict, sets, edge_best: str, engines: dict, ocloud, cloud, images, thr, temps) -> dict:
    """The row's figures of the ONNX Runtime float variants (``onnx_float_variants``) and how often the hybrid with
    the ONNX cloud half predicts as the one with the PyTorch cloud half on these images."""
    name = f"hybrid[{edge_best}, cloud onnx]"
    eng = engines[edge_best]
    same = int((conditional_inference(eng, ocloud, images, thr, temps).predictions
                == conditional_inference(eng, cloud, images, thr, temps).predictions).sum())
    return {"fp32_onnx_img_s": {b: round(ips[b]["fp32[onnx]"], 1) for b in sets},
            "hybrid_cloud_onnx": {"edge": edge_best, "img_s": {b: round(ips[b][name], 1) for b in sets},
                                  "same_prediction_as_pytorch_cloud": same},
            "speedup_onnx": {b: round(ips[b][name] / ips[b]["fp32[onnx]"], 2) for b in sets}}


FP32_OF = {"cifar10": "checkpoints/c10-r32-fp32", "cifar100": "checkpoints/c100-r32-fp32"}
HEADLINES = ("checkpoints/c10-r32-e20-b1-x20", "checkpoints/c100-r32-e24-b4-x24")


def measure(checkpoint: str, fp32_path: str | None, data_dir: str, n_images: int, rounds: int) -> dict:
    """One checkpoint's row: images per second of every variant, the ratios, bytes, agreement on these images."""
    from hybridexit.engines import engine_name, resolve_engine

    model, meta = load_model(checkpoint)
    dataset = meta.get("data", {}).get("name", "cifar10")
    fp32_path = fp32_path or FP32_OF[dataset]
    fp32, _ = load_model(fp32_path)
    policy = meta["policy"]
    thr, temps = policy.thresholds, (policy.temperatures or None)
    edge, cloud = model.split()
    edge.eval(), cloud.eval(), fp32.eval()
    fedge = float_edge(fp32, model.cfg)
    engines = {name: get_engine(name, edge) for name in available_engines(model.cfg)}
    images = get_split(load_cifar(dataset, data_dir), "test").images[:n_images]
    sets = {"b1": [images[i: i + 1] for i in range(len(images))], "b64": list(images.split(64))}
    with torch.no_grad():
        feats = edge(images[:64])
    fsets = {"b1": [feats[:1]] * len(images), "b64": [feats] * (len(images) // 64 or 1)}

    variants = {"fp32": fp32, "edge[float]": fedge}
    for name, eng in engines.items():
        variants[f"hybrid[{name}]"] = lambda x, e=eng: conditional_inference(e, cloud, x, thr, temps)
        variants[f"decide[{name}]"] = lambda x, e=eng: e.decide(x, thr, temps)
        variants[f"edge[{name}]"] = edge if name == "torch" else eng.forward
    edge_best = "packed" if "packed" in engines else "onnx"
    ocloud = onnx_float_variants(variants, engines, edge_best, fp32, cloud, thr, temps)
    times = {b: timed_rounds(variants, xs, rounds) for b, xs in sets.items()}
    ips = {b: {k: len(images) / t for k, t in ts.items()} for b, ts in times.items()}
    cloud_ms = {b: 1000 * timed_rounds({"cloud": cloud}, fs, rounds)["cloud"] / (len(fs) * fs[0].shape[0])
                for b, fs in fsets.items()}

    def per(prefix):
        return {name: {b: round(ips[b][f"{prefix}[{name}]"], 1) for b in sets} for name in engines}

    hybrid = per("hybrid")
    agree = agreement(engines, cloud, images, thr, temps)
    best = max(engines, key=lambda n: hybrid[n]["b1"])
    off = 1 - agree["exit_fraction"]
    decide_ms = {n: {b: round(1000 / ips[b][f"decide[{n}]"], 3) for b in sets} for n in engines}
    return {
        "checkpoint": checkpoint, "dataset": dataset, "fp32_checkpoint": fp32_path, "images": len(images),
        "thresholds": list(thr), "exit_fraction": round(agree["exit_fraction"], 4),
        "auto_engine": engine_name(get_engine("auto", edge)), "auto_resolves_to": resolve_engine("auto", model.cfg),
        "fp32_img_s": {b: round(ips[b]["fp32"], 1) for b in sets},
        "hybrid_img_s": hybrid,
        "decide_img_s": per("decide"),
        "edge_img_s": {"float": {b: round(ips[b]["edge[float]"], 1) for b in sets}, **per("edge")},
        "engine": best,
        "speedup": round(ips["b1"][f"hybrid[{best}]"] / ips["b1"]["fp32"], 2),
        "hybrid_speedup": {n: {b: round(ips[b][f"hybrid[{n}]"] / ips[b]["fp32"], 2) for b in sets} for n in engines},
        "edge_half_speedup": {n: {b: round(ips[b][f"edge[{n}]"] / ips[b]["edge[float]"], 2) for b in sets}
                              for n in engines},
        "per_image_ms": {  # what the hybrid's time is made of, per image on average (batch 1 and 64)
            "decide": decide_ms,
            "cloud_per_offloaded": {b: round(v, 3) for b, v in cloud_ms.items()},
            "cloud_share": {b: round(off * cloud_ms[b], 3) for b in sets},
            "fp32": {b: round(1000 / ips[b]["fp32"], 3) for b in sets},
        },
        "edge_bytes": artifact_sizes(engines, edge, fedge),
        "agreement": agree,
        **(onnx_float_figures(ips, sets, edge_best, engines, ocloud, cloud, images, thr, temps) if ocloud else {}),
        "isa": {n: e.isa_name for n, e in engines.items() if hasattr(e, "isa_name")},
    }


def add_run_args(p, images: int, out: str) -> None:
    """The options every timing benchmark here shares: data, images, rounds, output file, a note on the machine."""
    p.add_argument("--data-dir", default="data")
    p.add_argument("--images", type=int, default=images)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=out)
    p.add_argument("--note", default="", help="how the machine was shared during the run (stored with the results)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=None,
                   help="a checkpoint to measure (repeatable; default: both headlines)")
    p.add_argument("--fp32", default=None, help="the FP32 reference for every checkpoint (default: FP32_OF[dataset])")
    add_run_args(p, images=256, out="results/edge_speed.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(c, a.fp32, a.data_dir, a.images, a.rounds) for c in (a.checkpoint or HEADLINES)]
    result = {
        "rows": rows, "threads": 1, "rounds": a.rounds,
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical CPUs", "cpu_flags": cpu_flags(),
        "note": a.note, "torch": torch.__version__,
        "command": "python benchmarks/edge_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
