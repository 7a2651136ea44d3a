"""Edge-cloud runtime benchmark -> results/runtime.json.

    python benchmarks/runtime.py [CHECKPOINT] [--data-dir DIR] [--limit 1000] [--out results/runtime.json]

One cloud server in its own process (``hybridexit serve``, loopback, bearer token), edge clients in this process.
1. In-process reference: ``evaluate_conditional`` on the first ``--limit`` test images (accuracy, decisions).
2. Codecs: one edge client, batch size 1 (per-sample bytes and latency), for fp32 / fp16 / int8, each without
   and with zstd: bytes per offloaded sample (against sending the raw 3,072-byte image), accuracy and its change
   against in-process evaluation, and the number of decisions / predictions that differ from it.
3. Concurrency: 1 and 8 concurrent edge clients (threads, each with its own connection, each on 1/8 of the
   images), fp32: throughput, p50/p95 latency of samples decided at the edge and of offloaded ones, and the
   batch sizes the server formed (from each reply's X-Hybridexit-Batch-Samples header).

Edge and cloud share this machine's cores, so absolute latencies and throughput describe this machine, not a
real edge device and a real cloud; what carries over is bytes, accuracy, and how batching behaves under load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from hybridexit.codecs.links import RAW_IMAGE_BYTES
from hybridexit.data import get_split, load_cifar
from hybridexit.model.checkpoint import fingerprint, load_model
from hybridexit.model.energy import energy_report
from hybridexit.model.records import summarize
from hybridexit.runtime.client import EdgeOptions, EdgeRunner
from hybridexit.runtime.process import ServerProcess
from hybridexit.runtime.summary import EdgeStats, edge_summary
from hybridexit.workflows.evaluate import evaluate_conditional

CODECS = [("fp32", False), ("fp32", True), ("fp16", False), ("fp16", True), ("int8", False), ("int8", True)]


def run_clients(model, policy, fp, url, token, images, labels, clients: int, codec="fp32", compress=False):
    """``clients`` edge clients in threads, client k on the k-th contiguous slice; records in input order."""
    n = len(labels)
    bounds = [round(k * n / clients) for k in range(clients + 1)]
    parts: list = [None] * clients
    stats: list = [None] * clients
    errors: list[str] = []
    barrier = threading.Barrier(clients)

    def client(k):
        try:
            opts = EdgeOptions(url, token=token, codec=codec + ("+zstd" if compress else ""), batch_size=1)
            runner = EdgeRunner(model, policy, fp, opts)
            with runner.cloud:
                runner.check_cloud()
                barrier.wait()
                lo, hi = bounds[k], bounds[k + 1]
                parts[k] = runner.run(images[lo:hi], labels[lo:hi], start=lo)
                stats[k] = runner.stats
        except Exception as e:  # noqa: BLE001 - reported in the results
            errors.append(f"client {k}: {type(e).__name__}: {e}")
            barrier.abort()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0
    if errors:
        raise RuntimeError("; ".join(errors))
    recs = [r for p in parts for r in p]
    total = EdgeStats()
    for s in stats:
        total = total.merge(s)
    total.wall_s = wall_s
    return recs, total


def compare(recs, ref) -> dict:
    return {"decision_mismatches": sum(a["decided_at"] != b["decided_at"] for a, b in zip(recs, ref)),
            "prediction_mismatches": sum(a["prediction"] != b["prediction"] for a, b in zip(recs, ref))}


def pct(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="checkpoints/c10-r32-e20-b1-x20-xnor")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    p.add_argument("--out", default="results/runtime.json")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    model, meta = load_model(a.checkpoint)
    d = meta["data"]
    policy = meta["policy"]
    fp = fingerprint(a.checkpoint)
    ds = load_cifar(d.get("name", "cifar10"), a.data_dir)
    split = get_split(ds, "test").limit(a.limit)
    report = energy_report(model.cfg)

    t_all = time.perf_counter()
    decisions = evaluate_conditional(model, split, policy.thresholds, policy.temperatures or None)
    ref_summary = summarize(decisions, report, policy.thresholds)
    ref = [r.to_json() for r in decisions]
    print(f"in-process: accuracy {ref_summary['accuracy']:.4f}, edge fraction {ref_summary['edge_fraction']:.3f}",
          flush=True)

    token = secrets.token_hex(16)
    server_args = ["--threads", str(a.threads), "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)]
    result: dict = {
        "checkpoint": a.checkpoint, "model": model.cfg.name, "fingerprint": fp, "n": len(split),
        "dataset": f"{ds.name} test[:{len(split)}]",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads_per_process": a.threads, "device": "cpu" if not torch.cuda.is_available()
                    else torch.cuda.get_device_name(0)},
        "server": {"max_batch": a.max_batch, "max_wait_ms": a.max_wait_ms, "transport": "HTTP/1.1 over loopback"},
        "edge_batch_size": 1,
        "raw_image_bytes": RAW_IMAGE_BYTES,
        "in_process": {k: ref_summary[k] for k in ("accuracy", "edge_fraction", "exit_fraction", "cloud_fraction",
                                                   "expected_uj", "reduction")},
        "codecs": [], "concurrency": [],
    }
    with ServerProcess(a.checkpoint, server_args, env={"HYBRIDEXIT_TOKEN": token}) as srv:
        def one(clients, codec, compress):
            t0 = time.perf_counter()
            recs, stats = run_clients(model, policy, fp, srv.url, token, split.images, split.labels, clients,
                                      codec, compress)
            s = edge_summary(recs, report, policy.thresholds, stats)
            print(f"{clients} client(s) {codec}{'+zstd' if compress else ''}: accuracy {s['accuracy']:.4f}, "
                  f"{s['payload_bytes_per_offloaded'] or 0:.0f} B/offloaded, {s['throughput_per_s']:.1f}/s "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            return recs, stats, s

        for codec, compress in CODECS:
            recs, stats, s = one(1, codec, compress)
            per_off = s["payload_bytes_per_offloaded"]
            entry = {"codec": codec, "compressed": compress,
                     "payload_bytes_per_offloaded": per_off,
                     "payload_bytes_per_input": s["payload_bytes_per_input"],
                     "offloaded_vs_raw_image": per_off / RAW_IMAGE_BYTES if per_off else None,
                     "accuracy": s["accuracy"],
                     "accuracy_change_points": 100 * (s["accuracy"] - ref_summary["accuracy"]),
                     **compare(recs, ref),
                     "fallback": sum(r["decided_at"] == "fallback" for r in recs),
                     "latency_ms_offloaded_p50": s["latency_ms_offloaded_p50"],
                     "latency_ms_offloaded_p95": s["latency_ms_offloaded_p95"]}
            result["codecs"].append(entry)
            if (codec, compress) == ("fp32", False):
                fp32_single = (recs, stats, s)

        for clients in (1, a.clients):
            recs, stats, s = fp32_single if clients == 1 else one(clients, "fp32", False)
            at_edge = [r["latency_ms"] for r in recs if r["decided_at"].startswith("exit:")]
            offl = [r["latency_ms"] for r in recs if r["decided_at"] == "cloud"]
            sizes = Counter(stats.server_batch_samples)
            result["concurrency"].append({
                "clients": clients, "codec": "fp32", "wall_s": stats.wall_s,
                "throughput_per_s": len(recs) / stats.wall_s,
                "latency_ms_edge_p50": pct(at_edge, 50), "latency_ms_edge_p95": pct(at_edge, 95),
                "latency_ms_offloaded_p50": pct(offl, 50), "latency_ms_offloaded_p95": pct(offl, 95),
                "requests": stats.requests, "failed_requests": stats.failed_requests, "retries": stats.retries,
                "skipped_requests": stats.skipped_requests,
                "fallback": sum(r["decided_at"] == "fallback" for r in recs),
                "server_batch_samples_seen": {str(k): v for k, v in sorted(sizes.items())},
                "server_batch_samples_mean": float(np.mean(stats.server_batch_samples))
                if stats.server_batch_samples else None,
                "server_queue_ms_p50": pct(stats.server_queue_ms, 50),
                "server_compute_ms_p50": pct(stats.server_compute_ms, 50),
                "accuracy": s["accuracy"], **compare(recs, ref),
            })
    fp32 = next(c for c in result["codecs"] if c["codec"] == "fp32" and not c["compressed"])
    int8 = [c for c in result["codecs"] if c["codec"] == "int8"]
    result["checks"] = {
        "fp32_equals_in_process": fp32["decision_mismatches"] == 0 and fp32["prediction_mismatches"] == 0,
        "int8_accuracy_change_within_0.2_points": all(abs(c["accuracy_change_points"]) <= 0.2 for c in int8),
        "no_errors_with_concurrent_clients": all(c["failed_requests"] == c["skipped_requests"] == c["fallback"] == 0
                                                 for c in result["concurrency"]),
    }
    result["wall_s"] = time.perf_counter() - t_all
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["checks"]))
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
