"""The summary of an edge run: accuracy, where inputs were answered, latency percentiles, bytes on the wire, energy
(edge computation, radio, cloud), and its text table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..codecs.links import raw_image_bytes


@dataclass
class EdgeStats:
    """What the edge saw of the cloud over a run."""

    requests: int = 0  # offload requests sent (a retry is not a new request)
    attempts: int = 0  # HTTP requests actually sent, retries included
    retries: int = 0
    failed_requests: int = 0  # sent, but no answer after the retries (or refused)
    skipped_requests: int = 0  # not sent: the cloud was in its cool-down after a failure
    request_bytes: int = 0
    response_bytes: int = 0
    server_batch_samples: list[int] = field(default_factory=list)
    server_batch_requests: list[int] = field(default_factory=list)
    server_queue_ms: list[float] = field(default_factory=list)
    server_compute_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def merge(self, other: EdgeStats) -> EdgeStats:
        out = EdgeStats()
        for f in ("requests", "attempts", "retries", "failed_requests", "skipped_requests", "request_bytes",
                  "response_bytes"):
            setattr(out, f, getattr(self, f) + getattr(other, f))
        for f in ("server_batch_samples", "server_batch_requests", "server_queue_ms", "server_compute_ms"):
            setattr(out, f, getattr(self, f) + getattr(other, f))
        out.wall_s = max(self.wall_s, other.wall_s)
        return out


def _pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def edge_summary(records: list[dict], report, thresholds, stats: EdgeStats | None = None,
                 options=None, labelled: bool = True) -> dict:
    """``records.summarize`` plus bytes, latency and what the cloud did. ``inputs`` counts every input,
    ``unreadable_inputs`` those that could not be read (no answer: left out of every other figure), and
    ``fallback_inputs`` those the edge answered alone because the cloud failed. Fallbacks are no saving: they
    needed the cloud, so ``expected_uj`` and ``reduction`` charge them its cost (the energy of the system as
    designed at the measured exit rates); ``spent_uj`` is what was actually computed per input."""
    from ..model.records import Decision, summarize

    unreadable = sum(r["decided_at"] == "unreadable" for r in records)
    records = [r for r in records if r["decided_at"] != "unreadable"]
    s = summarize([Decision.from_json(r) for r in records], report, thresholds, None)
    if not labelled:
        s["accuracy"] = None
    n = len(records)
    fell = sum(r["decided_at"] == "fallback" for r in records)
    s.update({"inputs": n + unreadable, "unreadable_inputs": unreadable, "fallback_inputs": fell})
    if fell:
        designed = report.expected_uj(s["exit_fraction"])
        s.update({"expected_uj": designed, "reduction": report.fp32_uj / designed,
                  "spent_uj": designed - fell / n * report.cloud_uj})
    total = sum(r["payload_bytes"] for r in records)
    sent = [r for r in records if r["payload_bytes"] > 0]
    lat = [r["latency_ms"] for r in records]
    at_edge = [r["latency_ms"] for r in records if r["decided_at"].startswith("exit:")]
    offl = [r["latency_ms"] for r in records if r["decided_at"] == "cloud"]
    s.update({
        "payload_bytes_per_input": total / n if n else 0.0,
        "payload_bytes_per_offloaded": total / len(sent) if sent else None,
        "raw_image_bytes": raw_image_bytes(report.config),
        "latency_ms_p50": _pct(lat, 50),
        "latency_ms_p95": _pct(lat, 95),
        "latency_ms_edge_p50": _pct(at_edge, 50),
        "latency_ms_edge_p95": _pct(at_edge, 95),
        "latency_ms_offloaded_p50": _pct(offl, 50),
        "latency_ms_offloaded_p95": _pct(offl, 95),
    })
    if options is not None:
        s.update({"codec": options.frame_codec, "compressed": options.compress, "batch_size": options.batch_size,
                  "on_cloud_failure": options.on_cloud_failure})
    if stats is not None:
        bs = stats.server_batch_samples
        s.update({
            "requests": stats.requests,
            "failed_requests": stats.failed_requests,
            "skipped_requests": stats.skipped_requests,
            "retries": stats.retries,
            "response_bytes_per_request": stats.response_bytes / max(stats.requests - stats.failed_requests, 1),
            "server_batch_samples_mean": float(np.mean(bs)) if bs else None,
            "server_batch_samples_max": max(bs) if bs else None,
            "wall_s": stats.wall_s,
            "throughput_per_s": n / stats.wall_s if stats.wall_s > 0 else None,
        })
    return s


def _fmt_pct(v):
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _fmt_ms(a, b):
    return "n/a" if a is None else f"{a:.1f} / {b:.1f} ms"


def _energy_rows(s: dict) -> list[tuple[str, str]]:
    """Energy of the system as designed. Fallbacks skipped the cloud because it failed, not by design: they are
    charged the cloud's cost (edge_summary), and the rows say so."""
    fb = s.get("fallback_inputs", 0)
    costs = f"edge {s['edge_uj']:.2f}, cloud {s['cloud_uj']:.2f}; all-FP32 {s['fp32_uj']:.2f}"
    exp, red = s["expected_uj"], s["reduction"]
    energy = "n/a" if exp is None else f"{exp:.2f} uJ  ({costs})"
    reduction = "n/a" if red is None or not math.isfinite(red) else f"{red:.2f} x"
    if fb and exp is not None:
        energy += f"; spent {s['spent_uj']:.2f} uJ, the fallbacks on the edge alone"
        reduction += f"  (the {fb} fallbacks charged as cloud answers: skipping a failed cloud is not a saving)"
    return [("energy per image", energy), ("energy reduction", reduction)]


def format_summary(s: dict) -> str:
    """The summary as a two-column table; under cloud failure its second row says how many inputs fell back."""
    exits = ", ".join(f"exit {k}: {_fmt_pct(f)}" for k, f in enumerate(s["exit_fraction"]))
    per_off = s["payload_bytes_per_offloaded"]
    fb, bad = s.get("fallback_inputs", 0), s.get("unreadable_inputs", 0)
    rows = [("inputs", f"{s.get('inputs', s['n'])}" + (f"  ({bad} unreadable: no answer, see their records' error)"
                                                       if bad else ""))]
    if s.get("skipped_files"):
        rows.append(("skipped files", f"{s['skipped_files']} not images, no inputs (e.g. "
                                      f"{', '.join(s['skipped_examples'])})"))
    if fb:
        rows.append(("FELL BACK", f"{fb} of {s['n']} inputs ({_fmt_pct(fb / s['n'])}): the cloud failed, the edge's "
                                  f"last exit answered"))
    rows += [
        ("accuracy" + (" (fallbacks included)" if fb else ""), _fmt_pct(s["accuracy"])),
        ("decided at the edge", f"{_fmt_pct(s['edge_fraction'])}" + (f"  ({exits})" if exits else "")),
        ("answered by the cloud", _fmt_pct(s["cloud_fraction"])),
        ("fallback (cloud failed)", _fmt_pct(s["fallback_fraction"])),
        *_energy_rows(s),
        ("bytes sent per input", f"{s['payload_bytes_per_input']:.0f} B"),
        ("bytes per offloaded input", "n/a" if per_off is None else
         f"{per_off:.0f} B  (raw image {s['raw_image_bytes']} B: {per_off / s['raw_image_bytes']:.2f} x)"),
        ("latency p50 / p95", _fmt_ms(s["latency_ms_p50"], s["latency_ms_p95"])),
        ("  decided at the edge", _fmt_ms(s["latency_ms_edge_p50"], s["latency_ms_edge_p95"])),
        ("  answered by the cloud", _fmt_ms(s["latency_ms_offloaded_p50"], s["latency_ms_offloaded_p95"])),
    ]
    if "audits" in s:
        rows.append(("audits", (f"{s['audits']} at rate {s['audit_rate']:g} ({s['audit_disagreements']} disagreed; "
                                f"{s['free_audits']} free at level 0), {s['adaptations']} adaptations, level "
                                f"{s['audit_level']} of {s['audit_top_level']}; {s['audit_request_bytes']} B sent, "
                                f"{s['audit_cloud_uj']:.1f} uJ in the cloud")))
        if s.get("audit_burst_rate") is not None:
            rows.append(("  drift bursts", f"{s['drift_alarms']} alarms, {s['burst_audits']} audits at rate "
                                           f"{s['audit_burst_rate']:g}"))
        est = s["audit_estimate"]
        rows.append(("  disagreement now", "no audits at this level yet" if est["share"] is None else (
            f"{_fmt_pct(est['share'])} of {est['audits']} audits (upper bound {_fmt_pct(est['upper_bound'])}; "
            f"EPS {_fmt_pct(s['audit_eps'])})")))
    if "engine" in s:
        rows.append(("edge engine", s["engine"]))
    if "codec" in s:
        rows.append(("codec", f"{s['codec']}{' + zstd' if s['compressed'] else ''}, batch size {s['batch_size']}"))
    if "requests" in s:
        rows.append(("cloud requests", (f"{s['requests']} sent ({s['failed_requests']} failed, {s['retries']} retries"
                                       f", {s['skipped_requests']} skipped while the cloud was down)")))
        if s["server_batch_samples_mean"] is not None:
            rows.append(("server batch (samples)", (f"mean {s['server_batch_samples_mean']:.1f}, "
                                                   f"max {s['server_batch_samples_max']}")))
        if s["throughput_per_s"]:
            rows.append(("wall time", f"{s['wall_s']:.1f} s  ({s['throughput_per_s']:.1f} inputs/s)"))
    w = max(len(k) for k, _ in rows) + 2
    line = "-" * (w + 50)
    return "\n".join([line] + [f"{k:<{w}}{v}" for k, v in rows] + [line])
