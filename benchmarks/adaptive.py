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
radio of the trace's link kind, links.py, on request bodies + HTTP headers, probes included), and against the
exit policy's guarantee: the share of exit answers that differ from the whole network's answer (in process) for
the same inputs, and the whole network's accuracy on them.

Latency two ways: from the start of the edge's work on an input (``latency_ms_*``, ``within_slo``: what the
runtime's records say), and from the input's arrival (``arrival_*``: one input every ``--interval-ms``, so an
edge stalled on a request makes the inputs behind it wait; inputs still waiting when the trace ends count as
beyond the target). The second is a camera's view and the one the targets are read against.

Then the kill check: ``hybridexit edge --slo-ms`` through the commuter trace is killed (SIGKILL) after
``--kill-after`` records and resumed with ``--resume``; the row says whether each input has exactly one record.
Records of every run: runs/adaptive/ (not tracked).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import secrets
import signal
import subprocess
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
        rec = run_one(images[j:j + 1], int(labels[j]), i, waited_ms=max(time.monotonic() - due, 0.0) * 1000.0)
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

        def one(x, label, i, waited_ms=0.0):  # today's edge does not look at how long an input waited
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
    with edge:
        recs = _paced(wall_s, interval_s, images, labels, edge.run_one)
    plans = [{"plan": p.label, "exit_rate": p.exit_rate, "edge_ms_on": p.edge_ms_on, "request_bytes": p.request_bytes,
              **p.energy_uj(edge.link)} for p in edge.plans]
    return recs, {"probes": edge.probes, "probe_bytes": edge.probe_bytes, "plans": plans,
                  "profile_ms": {str(b): v for b, v in edge.profile.to_boundary_ms.items()},
                  "head_ms": edge.profile.head_ms, "levels": [list(lv) for lv in edge.levels]}


def arrival_metrics(recs: list[dict], wall_s: float, interval_ms: float, slo_ms: float) -> dict:
    """Latency from each input's arrival (input i arrives at i x interval; ``t_s`` is when its answer came):
    share of the arrivals answered within the target, percentiles (None beyond the run: never answered)."""
    import math

    import numpy as np

    arrivals = math.ceil(wall_s * 1000.0 / interval_ms)
    recs = [r for r in recs if r["index"] < arrivals]  # one more may have started exactly at the end
    lat = [r["t_s"] * 1000.0 - r["index"] * interval_ms for r in recs] + [math.inf] * max(arrivals - len(recs), 0)
    pct = {q: float(np.percentile(np.asarray(lat), q, method="higher")) for q in (50, 95, 99)}
    return {"arrivals": arrivals, "unanswered_at_end": max(arrivals - len(recs), 0),
            "arrival_within_slo": sum(v <= slo_ms for v in lat) / arrivals,
            **{f"arrival_ms_p{q}": (round(v, 3) if math.isfinite(v) else None) for q, v in pct.items()}}


def rescore(path: Path) -> None:
    """Recompute an existing results file's per-row summaries and arrival metrics from the runs' records
    (runs/adaptive/), e.g. after a summary's definition changed; the in-process comparison is kept."""
    res = json.loads(path.read_text())
    for row in res["rows"]:
        f = ROOT / "runs" / "adaptive" / f"{row['trace']}-{row['config'].replace('/', '_')}.jsonl"
        recs = [json.loads(line) for line in f.read_text().splitlines()]
        wall_s = Trace.read(ROOT / "benchmarks" / "traces" / f"{row['trace']}.csv").duration / res["speed"]
        row.update(adaptive_summary(recs, res["slo_ms"]))
        row.update(arrival_metrics(recs, wall_s, res["interval_ms"], res["slo_ms"]))
    res["rescored"] = ("summaries and arrival metrics recomputed from the runs' records (runs/adaptive/): "
                       "python benchmarks/adaptive.py --rescore")
    path.write_text(json.dumps(res, indent=1) + "\n")


def full_network(model, images) -> list[int]:
    """The whole network's answer per input (in process, batches of 500)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 500):
            out += model(images[i:i + 500])[-1].argmax(1).tolist()
    return out


def against_full(recs: list[dict], full: list[int], n_images: int) -> dict:
    exited = [r for r in recs if r["decided_at"].startswith("exit:")]
    return {"exit_disagreement": (sum(r["prediction"] != full[r["index"] % n_images] for r in exited) / len(exited)
                                  if exited else None),
            "exits": len(exited),
            "full_network_accuracy_same_inputs": sum(full[r["index"] % n_images] == r["label"] for r in recs)
            / len(recs) if recs else None}


def kill_check(ckpt, host, port, trace, speed, token, data_dir, n, kill_after, out_dir) -> dict:
    """``edge --slo-ms`` killed after ``kill_after`` records, then ``--resume``: each input exactly once?"""
    out = out_dir / "kill-resume.jsonl"
    out.unlink(missing_ok=True)
    env = {**os.environ, "HYBRIDEXIT_TOKEN": token, "PYTHONWARNINGS": "ignore"}
    with ShaperProcess(trace, (host, port), speed=speed) as sh:
        cmd = [sys.executable, "-m", "hybridexit.cli", "edge", str(ckpt), "--cloud", sh.url, "--data-dir", data_dir,
               "--limit", str(n), "--slo-ms", "150", "--threads", "1", "--out", str(out), "--json"]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while (out.read_bytes().count(b"\n") if out.exists() else 0) < kill_after:
            if p.poll() is not None:
                raise RuntimeError(p.stderr.read().decode()[-2000:])
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        at_kill = out.read_bytes().count(b"\n")
        cut = not out.read_bytes().endswith(b"\n")
        r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
    idx = [json.loads(line)["index"] for line in out.read_text().splitlines()]
    return {"inputs": n, "killed_after_records": at_kill, "cut_line_at_kill": cut, "records": len(idx),
            "each_input_exactly_once": sorted(idx) == list(range(n)) and len(idx) == n,
            "command": " ".join(cmd[1:]).replace(sh.url, "SHAPER_URL") + " (SIGKILL, then the same with --resume)"}


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
    ap.add_argument("--kill-inputs", type=int, default=400, help="inputs of the kill/--resume check (0: skip)")
    ap.add_argument("--kill-after", type=int, default=150)
    ap.add_argument("--rescore", action="store_true", help="only add the arrival metrics to --out from runs/adaptive/")
    ap.add_argument("--configs", nargs="*", default=None,
                    help="run only these configurations (e.g. adaptive adaptive-power) and replace their rows in --out, "
                         "keeping the others")
    ap.add_argument("--out", default=str(ROOT / "results" / "adaptive.json"))
    a = ap.parse_args(argv)
    if a.rescore:
        rescore(Path(a.out))
        return 0
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
    full = full_network(model.eval(), test.images)
    runs = ROOT / "runs" / "adaptive"
    runs.mkdir(parents=True, exist_ok=True)
    kill = None
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
            if a.configs is not None:
                configs = [c for c in configs if c[0] in a.configs]
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
                row = {"trace": name, "link": lk.name, "config": label, **s, **against_full(recs, full, len(full)),
                       **arrival_metrics(recs, wall_s, a.interval_ms, a.slo_ms), **extra,
                       "wall_s": round(time.time() - t0, 1)}
                with open(runs / f"{name}-{label.replace('/', '_')}.jsonl", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in recs)
                if label == "adaptive-power":
                    row["edge_watts"] = arg
                rows.append(row)
                print(f"{name:18s} {label:16s} within {100 * s['within_slo']:6.2f} %  p95 {s['latency_ms_p95']:8.1f} ms"
                      f"  acc {100 * s['accuracy']:.2f} %  compute {s['compute_uj']:8.1f} uJ  radio "
                      f"{s['radio_uj']:8.1f} uJ  routes {s['routes']}", flush=True)
        if a.kill_inputs:
            kill = kill_check(ckpt, host, int(port), ROOT / "benchmarks" / "traces" / "commuter_lte.csv", a.speed,
                              token, a.data_dir, a.kill_inputs, a.kill_after, runs)
            print("kill check:", kill, flush=True)
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
        "kill_check": kill,
    }
    if a.configs is not None and Path(a.out).exists():  # keep the rows not rerun, with the command that made them
        old = json.loads(Path(a.out).read_text())
        again = {(r["trace"], r["config"]) for r in rows}
        kept = [r for r in old["rows"] if (r["trace"], r["config"]) not in again]
        for r in kept:
            r.setdefault("command", old["command"])
        for r in rows:
            r["command"] = out["command"]
        order = {(r["trace"], r["config"]): i for i, r in enumerate(old["rows"])}
        out["rows"] = sorted(kept + rows, key=lambda r: order.get((r["trace"], r["config"]), len(order)))
        out["kill_check"] = kill or old.get("kill_check")
        out["command"] = f"{old['command']}; rows rerun: {out['command']}"
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
