"""Encode / decode time of a feature codec per offloaded sample, batch 1, one thread -> results/codec_speed.json.

    python benchmarks/codec_speed.py [--checkpoints CKPT ...] [--codec bn] [--split val] [--limit 1000] [--repeat 3]

For each checkpoint: the edge half runs on the first ``--limit`` images of the split at the checkpoint's exit
thresholds; each offloaded sample's features then go through what a batch-size-1 edge and its server do, one sample
at a time: ``encode`` is the whole frame (``wire.frame``: the codec's edge-side layers, the entropy coder, the
framing), ``decode`` is ``wire.decode`` with the receiver's own copy of the codec (parsing, checks, the entropy
decoder, the codec's cloud-side layers). The parts are timed too: ``layers`` (the bottleneck's edge-side /
cloud-side layers alone) and ``coder`` (the range coder alone). Each sample is timed ``--repeat`` times and its
fastest run kept (the machine is shared: the minimum is the least disturbed); the row holds the mean and median over
samples of wall time (``perf_counter``) and of this thread's CPU time (``thread_time``), in milliseconds.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["checkpoints/c10-r32-e20-b1-x20", "checkpoints/c10-r32-e20-b1-x20-bn12x3-r"]


def _timed(repeat: int, fn, *args, **kw) -> tuple[float, float, object]:
    """(fastest wall ms, fastest CPU ms, result) of ``repeat`` calls of ``fn(*args, **kw)``."""
    wall = cpu = float("inf")
    out = None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn(*args, **kw)
        c1, t1 = time.thread_time(), time.perf_counter()
        wall, cpu = min(wall, 1000 * (t1 - t0)), min(cpu, 1000 * (c1 - c0))
    return wall, cpu, out


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "median": statistics.median(values)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure(ckpt: str, name: str, split_name: str, limit: int, repeat: int, data_dir) -> dict:
    from hybridexit import codecs
    from hybridexit.data import load_cifar
    from hybridexit.model.checkpoint import fingerprint, load_model, split_of
    from hybridexit.runtime import wire
    from hybridexit.workflows import evaluate

    model, meta = load_model(ckpt)
    policy = meta["policy"]
    split = split_of(ckpt, load_cifar(meta["data"]["name"], data_dir), split_name).limit(limit)
    feats = evaluate.offloaded_features(model, split, policy.thresholds, policy.temperatures or None)
    codec = codecs.get(name, checkpoint=ckpt)
    held, fp = codecs.held_codecs(ckpt), fingerprint(ckpt)
    shape = (1, *feats.shape[1:])
    parts = {k: [] for k in ("encode", "decode", "encode_cpu", "decode_cpu", "layers_encode_cpu", "layers_decode_cpu",
                             "coder_encode_cpu", "coder_decode_cpu")}
    sizes = []
    learned = isinstance(codec, codecs.LearnedCodec)
    for j in range(len(feats)):
        x = feats[j:j + 1].contiguous()
        w, c, body = _timed(repeat, wire.frame, codec, x, fp)
        parts["encode"].append(w)
        parts["encode_cpu"].append(c)
        w, c, _ = _timed(repeat, wire.decode, body, fp, shape, codecs=held)
        parts["decode"].append(w)
        parts["decode_cpu"].append(c)
        sizes.append(len(body))
        if learned:
            _, c, sym = _timed(repeat, codec._fast.symbols, x)
            parts["layers_encode_cpu"].append(c)
            s = sym.numpy()[0]
            _, c, data = _timed(repeat, codec.coder.encode, s)
            parts["coder_encode_cpu"].append(c)
            _, c, _ = _timed(repeat, codec.coder.decode, data, s.shape)
            parts["coder_decode_cpu"].append(c)
            _, c, _ = _timed(repeat, codec._fast.from_symbols, sym)
            parts["layers_decode_cpu"].append(c)
    row = {"checkpoint": ckpt, "codec": name, "split": split_name, "images": len(split), "offloaded": len(sizes),
           "thresholds": list(policy.thresholds), "bytes_per_offloaded": statistics.fmean(sizes),
           "model_sha256": _sha256(Path(ckpt) / "model.safetensors"),
           **{f"{k}_ms": _summary(v) for k, v in parts.items() if v}}
    if learned:
        home = codecs.codec_home(ckpt)
        row.update({"codec_format": codec.format, "codec_dir": str(home),
                    "codec_sha256": _sha256(home / codecs.CODEC_TENSORS), "coder": type(codec.coder).__name__})
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", nargs="*", default=DEFAULT)
    ap.add_argument("--codec", default="bn")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--limit", type=int, default=1000, help="first N images of the split")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per sample (the fastest is kept)")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default="results/codec_speed.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for ckpt in a.checkpoints:
        r = measure(ckpt, a.codec, a.split, a.limit, a.repeat, a.data_dir)
        rows.append(r)
        print(f"{ckpt} {a.codec}: {r['bytes_per_offloaded']:.0f} B, encode {r['encode_ms']['median']:.3f} ms "
              f"(CPU {r['encode_cpu_ms']['median']:.3f}), decode {r['decode_ms']['median']:.3f} ms "
              f"(CPU {r['decode_cpu_ms']['median']:.3f}), medians over {r['offloaded']} offloaded samples",
              file=sys.stderr, flush=True)
    res = {"rows": rows, "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1,
                                     "note": "2 CPU cores shared with other jobs: wall times vary with the load; "
                                             "CPU times (this thread's) less so"},
           "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/codec_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
