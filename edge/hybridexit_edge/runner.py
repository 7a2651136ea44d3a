"""The edge loop of ``hybridexit edge`` without torch: per batch the native decision, one request for the samples
that did not exit, fallback to the last exit's answer when the cloud fails; one JSON record per input and the run's
summary, in the main package's format (``runtime/client.py``, ``runtime/summary.py``, ``model/records.py``)."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

from . import frames
from .artifact import PackedEdge
from .cloud import CloudClient, CloudError, CloudRejected, CloudUnavailable
from .errors import ConfigError

CLOUD, FALLBACK = -1, -2  # decided_at codes of a batch (the main package's hybrid.CLOUD / FALLBACK)
RAW_IMAGE_BYTES = 3 * 32 * 32
PLAIN_CODECS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Options:
    cloud_url: str
    token: str | None = None
    codec: str = "fp32"
    compress: bool = False
    batch_size: int = 1
    timeout_s: float = 10.0
    retries: int = 2
    retry_backoff_ms: float = 100.0
    cooldown_s: float = 5.0
    on_cloud_failure: str = "fallback"
    thresholds: tuple[float, ...] | None = None
    ca: str | None = None
    insecure: bool = False

    def __post_init__(self):
        if self.codec not in PLAIN_CODECS:
            raise ConfigError(f"codec {self.codec!r} is a learned or calibrated codec that runs in torch: use --codec "
                              "fp32, fp16 or int8 with hybridexit-edge, or the full package's `hybridexit edge`")
        if self.on_cloud_failure not in ("fallback", "error"):
            raise ConfigError(f"on_cloud_failure={self.on_cloud_failure!r}: use fallback or error")
        if self.batch_size < 1 or self.retries < 0 or self.timeout_s <= 0 or self.cooldown_s < 0:
            raise ConfigError("batch_size >= 1, retries >= 0, timeout_s > 0 and cooldown_s >= 0 expected")


@dataclass
class Stats:
    requests: int = 0
    attempts: int = 0
    retries: int = 0
    failed_requests: int = 0
    skipped_requests: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    server_batch_samples: list[int] = field(default_factory=list)
    wall_s: float = 0.0


def _split_bytes(total: int, n: int) -> list[int]:
    q, r = divmod(total, n)
    return [q + (1 if i < r else 0) for i in range(n)]


class EdgeRunner:
    engine = "packed"  # the same kernels as the main package's packed engine, hosted by hybridexit-edge

    def __init__(self, edge: PackedEdge, options: Options, cloud: CloudClient | None = None):
        self.edge, self.opt, m = edge, options, edge.manifest
        thr = options.thresholds if options.thresholds is not None else m["thresholds"]
        if thr is None and m["exits"]:
            raise ConfigError(f"no exit thresholds for {len(m['exits'])} exits: the checkpoint was exported before "
                              "calibration; calibrate it and export again, or pass --thresholds")
        self.thresholds = tuple(float(t) for t in (thr or ()))
        if len(self.thresholds) != len(m["exits"]):
            raise ConfigError(f"{len(self.thresholds)} thresholds for {len(m['exits'])} exits: give one per exit")
        self.temperatures = m["temperatures"]
        self.classes, self.fingerprint, self.num_classes = m["classes"], m["fingerprint"], m["num_classes"]
        self.cloud = cloud or CloudClient(options.cloud_url, options.token, options.timeout_s, options.retries,
                                          options.retry_backoff_ms, options.cooldown_s, options.ca, options.insecure)
        self.stats = Stats()

    def check_cloud(self) -> dict | None:
        """The server's identity: another model, feature shape or codec stops here; a cloud that is down is an
        error under ``error`` and a warning (on stderr) under ``fallback``."""
        try:
            info = self.cloud.info()
        except CloudRejected as e:
            if e.code == "tls_verify_failed":
                raise
            raise CloudRejected(f"{e}. Check --token-file / HYBRIDEXIT_TOKEN and the --cloud URL", e.status, e.code) from None
        except CloudUnavailable as e:
            if self.opt.on_cloud_failure == "error":
                raise
            print(f"hybridexit-edge: warning: {e}; samples that do not exit will fall back to the edge's answer "
                  "while the cloud is down", file=sys.stderr)
            return None
        if info.get("fingerprint") != self.fingerprint:
            raise CloudRejected(f"the cloud at {self.cloud.url} serves model {info.get('model')} (fingerprint "
                                f"{info.get('fingerprint')}), this edge runs fingerprint {self.fingerprint}: export and "
                                "serve the same checkpoint", 409, "wrong_fingerprint")
        if tuple(info.get("feature_shape", ())) != tuple(self.edge.feature_shape):
            raise CloudRejected(f"the cloud expects features {info.get('feature_shape')}, the edge produces "
                                f"{list(self.edge.feature_shape)}", 409, "wrong_shape")
        if "codecs" in info and self.opt.codec not in info["codecs"]:
            raise CloudRejected(f"the cloud decodes the codecs {', '.join(info['codecs'])}, not {self.opt.codec}",
                                409, "wrong_codec")
        return info

    def run_batch(self, images, labels: list[int], start: int) -> list[dict]:
        t0 = time.perf_counter()
        r = self.edge.decide(images, self.thresholds, self.temperatures)
        t_edge = time.perf_counter()
        preds, decided, remaining = r.predictions, r.decided_at, r.remaining
        lat, sent, errors = [(t_edge - t0) * 1000.0] * len(labels), [0] * len(labels), {}
        if remaining:
            body = frames.encode(r.features, len(remaining), self.edge.feature_shape, self.fingerprint,
                                 self.opt.codec, self.opt.compress)
            s = self.stats
            try:
                reply = self.cloud.infer(body, self.fingerprint, len(remaining), self.num_classes)
            except CloudError as e:
                tried = e.attempts > 0
                s.requests += tried
                s.failed_requests += tried
                s.skipped_requests += not tried
                if self.opt.on_cloud_failure == "error":
                    raise CloudError(f"input {start + remaining[0]}: {e}; use --on-cloud-failure fallback to answer "
                                     "with the edge's last exit instead", e.attempts) from None
                t_done = time.perf_counter()
                s.attempts += e.attempts
                s.retries += max(e.attempts - 1, 0)
                for i, b in zip(remaining, _split_bytes(len(body), len(remaining))):
                    decided[i], lat[i], sent[i], errors[i] = FALLBACK, (t_done - t0) * 1000.0, b if tried else 0, str(e)
                if tried:
                    s.request_bytes += len(body)
            else:
                t_done = time.perf_counter()
                s.requests += 1
                s.attempts += reply.attempts
                s.retries += reply.attempts - 1
                s.request_bytes += reply.request_bytes
                s.response_bytes += reply.response_bytes
                s.server_batch_samples.append(reply.batch_samples)
                for row, i, b in zip(reply.logits, remaining, _split_bytes(len(body), len(remaining))):
                    preds[i], lat[i], sent[i] = max(range(len(row)), key=row.__getitem__), (t_done - t0) * 1000.0, b
        recs = []
        ents = r.entropies
        for i, lab in enumerate(labels):
            code = int(decided[i])
            where = f"exit:{code}" if code >= 0 else "cloud" if code == CLOUD else "fallback"
            rec = {"index": start + i, "label": int(lab), "prediction": int(preds[i]), "decided_at": where,
                   "entropies": [round(e, 6) for e in ents[i] if not math.isnan(e)]}
            if self.classes:
                p, c = int(preds[i]), self.classes
                rec["prediction_name"] = c[p] if 0 <= p < len(c) else None
                rec["label_name"] = c[lab] if 0 <= lab < len(c) else None
            rec.update(latency_ms=round(lat[i], 3), payload_bytes=sent[i], engine=self.engine)
            if i in errors:
                rec["error"] = errors[i]
            recs.append(rec)
        return recs

    def iter_records(self, images, labels: list[int]):
        """``images``: uint8 (N, C, H, W) in C order, any bytes-like object; one record per input, in order."""
        bs, t_run = self.opt.batch_size, time.perf_counter()
        x, img = memoryview(images).cast("B"), len(memoryview(images).cast("B")) // max(len(labels), 1)
        for i in range(0, len(labels), bs):
            recs = self.run_batch(x[i * img:(i + bs) * img], labels[i:i + bs], i)
            self.stats.wall_s = time.perf_counter() - t_run
            yield from recs


def _pct(values, q):
    """numpy.percentile's default (linear interpolation between the closest ranks)."""
    if not values:
        return None
    v = sorted(map(float, values))
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(records: list[dict], runner: EdgeRunner) -> dict:
    """The keys of the main package's edge summary that a run without audits has (energy from the manifest)."""
    m, opt, st = runner.edge.manifest, runner.opt, runner.stats
    energy, k, n = m["energy_uj"], len(m["exits"]), len(records)
    counts = [sum(r["decided_at"] == f"exit:{j}" for r in records) for j in range(k)]
    fell = sum(r["decided_at"] == "fallback" for r in records)
    fr = [c / n if n else 0.0 for c in counts]

    def expected(rates):
        return sum(r * e for r, e in zip(rates, energy["exit_path"])) + (1.0 - sum(rates)) * (energy["edge"] + energy["cloud"])

    served = n - fell
    exp = expected([c / served for c in counts]) if served else None
    labelled = [r for r in records if r["label"] >= 0]
    s = {"n": n, "accuracy": (sum(r["prediction"] == r["label"] for r in labelled) / len(labelled)
                              if labelled and len(labelled) == n else None),
         "exit_fraction": fr, "edge_fraction": sum(fr),
         "cloud_fraction": sum(r["decided_at"] == "cloud" for r in records) / n if n else 0.0,
         "fallback_fraction": fell / n if n else 0.0, "cloud_accuracy": None, "thresholds": list(runner.thresholds),
         "fp32_uj": energy["fp32"], "edge_uj": energy["edge"], "cloud_uj": energy["cloud"], "expected_uj": exp,
         "reduction": energy["fp32"] / exp if exp else None, "inputs": n, "unreadable_inputs": 0,
         "fallback_inputs": fell}
    if fell:
        designed = expected(fr)
        s.update(expected_uj=designed, reduction=energy["fp32"] / designed, spent_uj=designed - fell / n * energy["cloud"])
    total = sum(r["payload_bytes"] for r in records)
    sent = [r for r in records if r["payload_bytes"] > 0]
    lat = [r["latency_ms"] for r in records]
    at_edge = [r["latency_ms"] for r in records if r["decided_at"].startswith("exit:")]
    offl = [r["latency_ms"] for r in records if r["decided_at"] == "cloud"]
    s.update({"payload_bytes_per_input": total / n if n else 0.0,
              "payload_bytes_per_offloaded": total / len(sent) if sent else None, "raw_image_bytes": RAW_IMAGE_BYTES,
              "latency_ms_p50": _pct(lat, 50), "latency_ms_p95": _pct(lat, 95),
              "latency_ms_edge_p50": _pct(at_edge, 50), "latency_ms_edge_p95": _pct(at_edge, 95),
              "latency_ms_offloaded_p50": _pct(offl, 50), "latency_ms_offloaded_p95": _pct(offl, 95),
              "codec": opt.codec, "compressed": opt.compress, "batch_size": opt.batch_size,
              "on_cloud_failure": opt.on_cloud_failure, "requests": st.requests, "failed_requests": st.failed_requests,
              "skipped_requests": st.skipped_requests, "retries": st.retries,
              "response_bytes_per_request": st.response_bytes / max(st.requests - st.failed_requests, 1),
              "server_batch_samples_mean": statistics.fmean(st.server_batch_samples) if st.server_batch_samples else None,
              "server_batch_samples_max": max(st.server_batch_samples) if st.server_batch_samples else None,
              "wall_s": st.wall_s, "throughput_per_s": n / st.wall_s if st.wall_s > 0 else None,
              "engine": runner.engine})
    return s


def run_edge(folder, images, labels: list[int], options: Options, out=None) -> tuple[dict, list[dict]]:
    """Load the exported edge, check the cloud, run every input (records streamed to ``out``), summarize."""
    runner = EdgeRunner(PackedEdge(folder), options)
    recs: list[dict] = []
    with open(out, "w") if out else _Null() as f, runner.cloud:
        runner.check_cloud()
        for rec in runner.iter_records(images, labels):
            recs.append(rec)
            if f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
    return summarize(recs, runner), recs


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
