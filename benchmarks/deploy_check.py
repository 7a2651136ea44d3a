"""The deployed pair against the in-process run -> results/deploy_check.json.

    python benchmarks/deploy_check.py [--checkpoint checkpoints/c10-r32-e20-b1-x20] [--codec CODEC] [--limit 1000]
                                      [--data-dir data]

Runs exactly what ``make demo`` runs (``runtime.demo.run_demo``: ``hybridexit serve`` in its own process on
loopback, ``hybridexit edge`` with ``--engine auto`` and the codec over HTTP, one thread per process) on the first
``--limit`` test images, and ``hybridexit evaluate CKPT --split test --limit N --engine auto --codec CODEC --out``
in process on the same images; compares every record: prediction, where it was decided, payload bytes. The
default codec is the checkpoint's own (``runtime.demo.default_codec``: its learned codec if it carries one), else
fp32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FIELDS = ("prediction", "decided_at", "payload_bytes")


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/c10-r32-e20-b1-x20")
    p.add_argument("--codec", default=None, help="default: the checkpoint's own codec, else fp32")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="results/deploy_check.json")
    a = p.parse_args(argv)
    from hybridexit.cli.deploy_demo import default_codec, run_demo

    codec = a.codec or default_codec(a.checkpoint)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as d:
        edge_out, local_out = f"{d}/edge.jsonl", f"{d}/local.jsonl"
        summary = run_demo(a.checkpoint, a.data_dir, a.limit, codec=codec, out=edge_out)
        cmd = [str(Path(sys.executable).parent / "hybridexit"), "evaluate", a.checkpoint, "--data-dir", a.data_dir, "--split",
               "test", "--limit", str(a.limit), "--engine", "auto", "--codec", codec, "--json", "--out", local_out]
        local = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
        edge, inproc = read(edge_out), read(local_out)
    assert [r["index"] for r in edge] == [r["index"] for r in inproc], "records out of order"
    diff = [{"index": e["index"], "edge": {k: e.get(k) for k in FIELDS}, "in_process": {k: i.get(k) for k in FIELDS}}
            for e, i in zip(edge, inproc) if any(e.get(k) != i.get(k) for k in FIELDS)]
    weights = Path(a.checkpoint) / "model.safetensors"
    result = {
        "checkpoint": a.checkpoint, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "codec": codec, "images": len(edge),
        "engine": {"edge": sorted({r.get("engine") for r in edge}), "in_process": local.get("engine")},
        "same": {k: sum(e.get(k) == i.get(k) for e, i in zip(edge, inproc)) for k in FIELDS},
        "identical_records": len(edge) - len(diff), "differences": diff[:20],
        "thresholds": summary.get("thresholds"),
        "edge_summary": {k: summary.get(k) for k in ("accuracy", "edge_fraction", "payload_bytes_per_offloaded",
                                                       "throughput_per_s", "latency_ms_p50", "latency_ms_p95")},
        "in_process_summary": {k: local.get(k) for k in ("accuracy", "edge_fraction", "payload_bytes_per_offloaded")},
        "command": "python benchmarks/deploy_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(a.out)  # one row per checkpoint and codec; a run replaces its own row
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [r for r in rows if (r["checkpoint"], r["codec"]) != (a.checkpoint, codec)] + [result]
    out.write_text(json.dumps({"rows": sorted(rows, key=lambda r: (r["checkpoint"], r["codec"]))}, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "differences"}))
    return result


if __name__ == "__main__":
    main()
