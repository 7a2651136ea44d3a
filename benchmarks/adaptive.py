"""Adaptive offloading against static policies over replayed links -> results/adaptive.json.

    .venv/bin/python benchmarks/adaptive.py [--checkpoint checkpoints/c10-r32-e20-b1-x20] [--speed 3]
        [--interval-ms 50] [--slo-ms 150] [--edge-watts 2] [--out results/adaptive.json]

One cloud server in its own process (``hybridexit serve``, loopback, bearer token, one thread); per trace of
benchmarks/traces/ and per configuration, a fresh link shaper (runtime/shaper.py, its own process) between the
edge (this process, one torch thread) and the server, replaying the trace from its first connection. Inputs are
the test split's images in order, one every ``--interval-ms`` (a camera; the next starts at once when one ran
late), for as long as the trace plays. Time is compressed ``--speed`` times (a 240 s trace plays in 80 s at 3):
rates and delays are the trace's, their changes come faster.

Configurations, batch 1:
- static: today's edge (``EdgeRunner``, the checkpoint's boundary, its exit policy, default timeouts, retries and
  fallback) with each codec of ``--static-codecs``;
- adaptive: ``AdaptiveEdge`` under ``--slo-ms`` at p95, plans over the checkpoint's boundary (each codec) and the
  whole network on the edge, each certified exit policy level; edge computation priced by the energy model;
- adaptive-power (with ``--edge-watts``): the same, the edge's computation priced at its measured time x that
  power (an assumption: the energy model's 45 nm MAC energies make local computation nearly free).

Per row: share of inputs within the target, p50/p95/p99 latency, accuracy, routes (exit / cloud / local /
fallback), degraded answers, bytes per input, the edge's energy per input split into computation and radio (the
radio of the trace's link kind, links.py, on request bodies + HTTP headers, probes included).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import secrets
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hybridexit.codecs.links import codec_uj, link  # noqa: E402
from hybridexit.data import get_split, load_cifar  # noqa: E402
from hybridexit.model.checkpoint import fingerprint, load_model, split_of  # noqa: E402
from hybridexit.model.energy import EnergyTable, energy_report  # noqa: E402
from hybridexit.runtime.adaptive_edge import (  # noqa: E402
    AdaptiveEdge,
    AdaptiveOptions,
    adaptive_summary,
    codec_specs,
    request_overhead,
)
from hybridexit.runtime.client import EdgeOptions, EdgeRunner  # noqa: E402
from hybridexit.runtime.process import ServerProcess  # noqa: E402
from hybridexit.runtime.shaper import ShaperProcess, Trace  # noqa: E402

TRACES = {"commuter_lte": "lte", "wifi_interference": "wifi", "outage_30s": "lte"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _paced(n_wall_s: float, interval_s: float, images, labels, run_one):
    """Run inputs one every ``interval_s`` for ``n_wall_s`` seconds (cycling through the images)."""
    recs, t_start, i = [], time.monotonic(), 0
    while True:
        due = t_start + i * interval_s
        now = time.monotonic()
        if now - t_start >= n_wall_s:
            return recs
        if due > now:
            time.sleep(due - now)
        j = i % len(labels)
        rec = run_one(images[j:j + 1], int(labels[j]), i)
        rec["t_s"] = round(time.monotonic() - t_start, 3)
        recs.append(rec)
        i += 1


def static_energy(rec: dict, rep, codec_edge_uj: float, lk, overhead: int) -> tuple[float, float]:
    """(computation, radio) of a static edge's record: its exit path, or the edge half (+ codec) and the frame."""
    if rec["decided_at"].startswith("exit:"):
        compute = rep.exit_path_uj[int(rec["decided_at"][5:])]
    else:
        compute = rep.edge_uj + codec_edge_uj
    sent = rec["payload_bytes"]
    return compute, lk.transmit_uj(sent + overhead) if sent else 0.0


def run_static(model, policy, fp, url, token, codec_label, codecs, images, labels, wall_s, interval_s, lk, rep):
    codec, z = codecs[codec_label]
    name = codec if isinstance(codec, str) else codec.name
    opts = EdgeOptions(url, token=token, codec=name + ("+zstd" if z else ""), batch_size=1, engine="auto")
    runner = EdgeRunner(model, policy, fp, opts, feature_codec=None if isinstance(codec, str) else codec)
    overhead = request_overhead(url, token)
    shape = tuple(model.split()[0].feature_shape)
    cuj = 0.0 if isinstance(codec, str) else codec_uj(codec.edge_macs(shape), EnergyTable())
    with runner.cloud:
        runner.check_cloud()

        def one(x, label, i):
            rec = runner.run_batch(x, torch.tensor([label]), i)[0]
            rec["compute_uj"], rec["radio_uj"] = static_energy(rec, rep, cuj, lk, overhead)
            rec["plan"] = f"static/{codec_label}"
            return rec

        return _paced(wall_s, interval_s, images, labels, one)


def run_adaptive(model, policy, fp, url, token, ckpt, codecs, val_images, images, labels, wall_s, interval_s,
                 link_name, slo_ms, edge_watts):
    opts = EdgeOptions(url, token=token, batch_size=1, engine="auto", timeout_s=10.0)
    ad = AdaptiveOptions(slo_ms=slo_ms, link=link_name, edge_watts=edge_watts, codecs=tuple(codecs))
    edge = AdaptiveEdge(model, policy, fp, opts, ad, codecs, val_images)
    with edge.cloud:
        recs = _paced(wall_s, interval_s, images, labels, edge.run_one)
    plans = [{"plan": p.label, "exit_rate": p.exit_rate, "edge_ms_on": p.edge_ms_on, "request_bytes": p.request_bytes,
              **p.energy_uj(edge.link)} for p in edge.plans]
    return recs, {"probes": edge.probes, "probe_bytes": edge.probe_bytes, "plans": plans,
                  "profile_ms": {str(b): v for b, v in edge.profile.to_boundary_ms.items()},
                  "head_ms": edge.profile.head_ms, "levels": [list(lv) for lv in edge.levels]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/c10-r32-e20-b1-x20")
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--traces", nargs="*", default=list(TRACES))
    ap.add_argument("--speed", type=float, default=3.0)
    ap.add_argument("--interval-ms", type=float, default=50.0)
    ap.add_argument("--slo-ms", type=float, default=150.0)
    ap.add_argument("--static-codecs", nargs="*", default=["bn", "int8+zstd", "fp32"])
    ap.add_argument("--edge-watts", type=float, default=None)
    ap.add_argument("--out", default=str(ROOT / "results" / "adaptive.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ckpt = Path(a.checkpoint)
    model, meta = load_model(ckpt)
    policy = meta["policy"]
    fp = fingerprint(ckpt)
    ds = load_cifar(meta.get("data", {}).get("name", "cifar10"), a.data_dir)
    test = get_split(ds, "test")
    val = split_of(ckpt, ds, "val")
    rep = energy_report(model.cfg)
    codecs = codec_specs(sorted(set(a.static_codecs)), ckpt)
    token = secrets.token_hex(16)
    rows = []
    with ServerProcess(ckpt, ["--threads", "1"], env={"HYBRIDEXIT_TOKEN": token}) as srv:
        host, port = srv.url.split("://")[1].split(":")
        for name in a.traces:
            path = ROOT / "benchmarks" / "traces" / f"{name}.csv"
            trace = Trace.read(path)
            wall_s = trace.duration / a.speed
            lk = link(TRACES.get(name, "lte"))
            configs = [(f"static/{c}", c) for c in a.static_codecs] + [("adaptive", None)]
            if a.edge_watts:
                configs.append(("adaptive-power", a.edge_watts))
            for label, arg in configs:
                t0 = time.time()
                with ShaperProcess(path, (host, int(port)), speed=a.speed) as sh:
                    extra = {}
                    if label.startswith("static"):
                        recs = run_static(model, policy, fp, sh.url, token, arg, codecs, test.images, test.labels,
                                          wall_s, a.interval_ms / 1000, lk, rep)
                    else:
                        recs, extra = run_adaptive(model, policy, fp, sh.url, token, ckpt, codecs, val.images,
                                                   test.images, test.labels, wall_s, a.interval_ms / 1000, lk.name,
                                                   a.slo_ms, arg if label == "adaptive-power" else None)
                s = adaptive_summary(recs, a.slo_ms)
                row = {"trace": name, "link": lk.name, "config": label, **s, **extra,
                       "wall_s": round(time.time() - t0, 1)}
                if label == "adaptive-power":
                    row["edge_watts"] = arg
                rows.append(row)
                print(f"{name:18s} {label:16s} within {100 * s['within_slo']:6.2f} %  p95 {s['latency_ms_p95']:8.1f} ms"
                      f"  acc {100 * s['accuracy']:.2f} %  compute {s['compute_uj']:8.1f} uJ  radio "
                      f"{s['radio_uj']:8.1f} uJ  routes {s['routes']}", flush=True)
    out = {
        "command": "python benchmarks/adaptive.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} torch thread), "
                   f"shared with other jobs",
        "checkpoint": str(ckpt), "model_sha256": _sha256(ckpt / "model.safetensors"),
        "speed": a.speed, "interval_ms": a.interval_ms, "slo_ms": a.slo_ms, "static_codecs": a.static_codecs,
        "guarantee": (policy.guarantee or {}).get("statement") if policy else None,
        "eps": (policy.guarantee or {}).get("eps") if policy else None,
        "energy": {"fp32_uj": rep.fp32_uj, "edge_uj": rep.edge_uj, "cloud_uj": rep.cloud_uj,
                   "exit_path_uj": rep.exit_path_uj},
        "rows": rows,
    }
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
