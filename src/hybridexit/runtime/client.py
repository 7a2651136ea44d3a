"""The edge: EdgeNet and its exits run here, batch by batch; only the samples that did not exit go to the cloud.

Per batch of ``batch_size`` inputs (default 1, i.e. streaming, one input at a time as a camera would deliver
them): the edge runs Algorithm 1 (``EdgeNet.decide``); the samples that did not exit are sent in ONE request
(one wire frame holding their features) and the cloud's logits give their answers. With ``batch_size=1`` every
number is per sample and honest: ``latency_ms`` is the time from the start of that input's preprocessing to its
answer (edge compute for samples decided at an exit; + encoding, network, queueing, cloud compute, decoding and
any retries for offloaded ones), ``payload_bytes`` the exact request body sent for it. With larger batches
every sample of a batch shares the batch's timing and the body is split evenly over the offloaded samples.

Faults: a request that fails (connection refused or reset, timeout, 5xx, 408, 429) is retried ``retries`` times
with exponential backoff. When it still fails, ``on_cloud_failure`` decides: ``fallback`` answers with the
prediction of the last exit the sample reached (``decided_at: "fallback"``, with the reason in ``error``), or
``error`` stops with ``CloudUnavailable``. After a request has exhausted its retries the cloud is considered
down for ``cooldown_s`` seconds (later samples fall back at once instead of each waiting for its retries); then
it is tried again. Every input gets exactly one record.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch

from .. import codecs
from ..data.inputs import Inputs
from ..device import pick_device
from ..errors import ConfigError
from ..model.checkpoint import fingerprint, load_model
from ..model.energy import energy_report
from ..model.hybrid import FALLBACK, Decisions, resolve_thresholds
from ..model.records import unreadable_record
from . import audit, wire
from .summary import EdgeStats, edge_summary
from .transport import (
    CloudClient,
    CloudDownWarning,
    CloudError,
    CloudRejected,
    CloudUnavailable,
    is_loopback,
    protocol_mismatch,
    tls_context,
)

FAILURE_POLICIES = ("fallback", "error")


@dataclass(frozen=True)
class EdgeOptions:
    cloud_url: str
    token: str | None = None
    codec: str = "fp32"  # a name of the codec registry (hybridexit.codecs.CODEC_CHOICES): fp32, int8+zstd, q2, bn, ...
    batch_size: int = 1
    timeout_s: float = 10.0
    retries: int = 2
    retry_backoff_ms: float = 100.0
    cooldown_s: float = 5.0
    on_cloud_failure: str = "fallback"
    thresholds: tuple[float, ...] | None = None
    device: str | None = None
    ca: str | None = None  # CA certificate (PEM) that signed an https server's certificate; None: the system's
    engine: str = "auto"  # the edge half's engine (hybridexit.engines): auto (the fastest here), torch, onnx, packed
    audit_rate: float = 0.0  # share of exited inputs also sent to the cloud to measure disagreement (runtime/audit.py)
    audit_eps: float | None = None  # the disagreement the audit holds the exits to (default: the policy's EPS)
    audit_seed: int = 0
    audit_burst_rate: float | None = None  # audit rate during a drift burst (runtime/audit.py)
    insecure: bool = False  # allow the token over plain HTTP to a non-loopback address

    def __post_init__(self):
        from ..codecs import check_name

        check_name(self.codec)  # fp32/fp16/int8 (+zstd), or a named codec (hybridexit.codecs)
        if self.on_cloud_failure not in FAILURE_POLICIES:
            raise ConfigError(f"on_cloud_failure={self.on_cloud_failure!r}: use one of {', '.join(FAILURE_POLICIES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be at least 1")
        if self.retries < 0 or self.timeout_s <= 0 or self.retry_backoff_ms < 0 or self.cooldown_s < 0:
            raise ConfigError("retries, retry_backoff_ms and cooldown_s must be >= 0 and timeout_s > 0")
        if not self.cloud_url.startswith(("http://", "https://")):
            raise ConfigError(f"cloud URL {self.cloud_url!r} must start with http:// or https://")
        host = urlsplit(self.cloud_url).hostname or ""
        if self.token and self.cloud_url.startswith("http://") and not is_loopback(host) and not self.insecure:
            raise ConfigError(f"{self.cloud_url} is plain HTTP to another machine: the bearer token and the features "
                              f"would cross the network in clear; use https:// (with --ca if needed), or pass --insecure "
                              f"on a network you trust")
        if self.ca is not None:
            tls_context(self.ca)  # a file that is not a CA certificate is refused now, not at the first request

    @property
    def frame_codec(self) -> str:
        """The codec the frames name (``int8`` for ``int8+zstd``)."""
        from ..codecs import frame_codec

        return frame_codec(self.codec)[0]

    @property
    def compress(self) -> bool:
        """zstd on the frames' payload: the ``+zstd`` of an fp32 / fp16 / int8 codec name."""
        from ..codecs import frame_codec

        return frame_codec(self.codec)[1]


def _split_bytes(total: int, n: int) -> list[int]:
    """``total`` bytes over ``n`` samples as integers that add up to ``total``."""
    q, r = divmod(total, n)
    return [q + (1 if i < r else 0) for i in range(n)]


def _audit_batch(runner, images, preds, decided, entropies, start: int, level: int) -> dict[int, dict]:
    """The audits of one batch that the edge decided at ``level`` (``EdgeRunner.run_batch``; the statistics are
    ``audit.AuditController``'s): the chosen exited
    inputs' edge features go to the cloud in one request (headers ``X-Hybridexit-Audit``: the edge's answers,
    ``X-Hybridexit-Audit-Level``), each outcome goes to the controller. At level 0 the cloud's answer replaces the
    edge's (``preds`` / ``decided`` are changed in place). Returns per batch index the record fields."""
    from ..model.hybrid import CLOUD

    ctl = runner.audit
    shadow = level == 0
    out = {i: {"thresholds": list(ctl.levels[level]), "audit_level": level, "audited": False}
           for i in range(len(preds))}
    for i, w in enumerate(audit.would_exit(entropies, ctl.levels[ctl.top])):  # the drift monitor sees every input
        if ctl.see(w, start + i):
            out[i]["drift_alarm"] = True
    chosen = [i for i in (decided >= 0).nonzero().flatten().tolist() if ctl.draw()]
    if not chosen:
        return out
    feats = runner.edge.forward(images[chosen].to(runner.device))
    body = wire.encode(feats, runner.fingerprint, runner.wire_codec, runner.opt.compress)
    edge_answers = [int(preds[i]) for i in chosen]
    headers = {"X-Hybridexit-Audit": ",".join(map(str, edge_answers)), "X-Hybridexit-Audit-Level": f"{level}/{ctl.top}"}
    try:
        reply = runner.cloud.infer(body, runner.fingerprint, runner.cfg.num_classes, headers=headers)
    except CloudError as e:
        ctl.failed_audits += 1
        if shadow and runner.opt.on_cloud_failure == "error":
            raise
        for i in chosen if shadow else []:  # level 0: the cloud was to answer them; the edge's answer falls back
            decided[i] = FALLBACK
            out[i]["error"] = str(e)
        return out
    ctl.request_bytes += reply.request_bytes
    ctl.response_bytes += reply.response_bytes
    for i, b, c in zip(chosen, _split_bytes(reply.request_bytes, len(chosen)), reply.logits.argmax(1).tolist()):
        out[i].update(audited=True, audit_disagrees=c != int(preds[i]), audit_bytes=b)
        ctl.observe(level, c != int(preds[i]), start + i)
        if shadow:
            preds[i], decided[i] = c, CLOUD
            out[i]["payload_bytes"] = b
    return out


class EdgeRunner:
    """Runs the edge half of a checkpoint and talks to the cloud for the samples that do not exit."""

    def __init__(self, model, policy, fingerprint: str, options: EdgeOptions, cloud: CloudClient | None = None,
                 classes: list[str] | None = None, feature_codec=None):
        self.opt = options
        # what goes on the wire: a named codec object (hybridexit.codecs), or the name of a version-1 codec
        self.wire_codec = feature_codec if feature_codec is not None else options.frame_codec
        self.device = pick_device(options.device or None)
        edge, _ = model.split()
        from ..engines import engine_name, get_engine

        self.edge = get_engine(options.engine, edge.eval().to(self.device))
        self.engine = engine_name(self.edge)  # what auto resolved to, named in every record and the summary
        self.cfg = model.cfg
        given = options.thresholds if options.thresholds is not None else (policy.thresholds if policy else None)
        self.thresholds = resolve_thresholds(self.cfg, given)
        self.temperatures = (policy.temperatures or None) if policy else None
        self.audit = None
        if options.audit_rate > 0:
            from .audit import controller_for

            self.audit = controller_for(policy, self.thresholds, options)
        self.classes = classes
        self.fingerprint = fingerprint
        self.cloud = cloud or CloudClient(options.cloud_url, options.token, options.timeout_s, options.retries,
                                          options.retry_backoff_ms, options.cooldown_s, options.ca)
        self.stats = EdgeStats()

    def check_cloud(self) -> dict | None:
        """Ask the server who it is. A different model or a refused token stops here (whatever the failure
        policy); an unreachable server is an error under ``error`` and a warning under ``fallback``."""
        try:
            info = self.cloud.info()
        except CloudRejected as e:
            if e.code in ("tls_verify_failed", "protocol_mismatch"):
                raise
            raise e.with_context("", ". Check --token-file / HYBRIDEXIT_TOKEN and the --cloud URL") from None
        except CloudUnavailable as e:
            why = protocol_mismatch(self.cloud.url, self.opt.timeout_s)
            if why:  # not an outage: this URL can never work, whatever the failure policy
                raise CloudRejected(f"{self.cloud.url}: {why}", 0, "protocol_mismatch", e.attempts) from None
            if self.opt.on_cloud_failure == "error":
                raise
            warnings.warn(f"{e}; samples that do not exit will fall back to the edge's answer while the cloud is "
                          f"down", CloudDownWarning, stacklevel=2)
            return None
        if info.get("fingerprint") != self.fingerprint:
            raise CloudRejected(
                f"the cloud at {self.cloud.url} serves model {info.get('model')} (fingerprint "
                f"{info.get('fingerprint')}), this edge runs fingerprint {self.fingerprint}: start both halves from "
                f"the same checkpoint", 409, wire.FingerprintMismatch.code)
        if tuple(info.get("feature_shape", ())) != tuple(self.edge.feature_shape):
            raise CloudRejected(f"the cloud expects features {info.get('feature_shape')}, the edge produces "
                                f"{list(self.edge.feature_shape)}", 409, wire.WrongShape.code)
        if "codecs" in info and self.opt.frame_codec not in info["codecs"]:
            raise CloudRejected(f"the cloud decodes the codecs {', '.join(info['codecs'])}, not {self.opt.codec}: run "
                                f"the edge with one of them", 409, wire.CodecMismatch.code)
        return info

    def run_batch(self, images: torch.Tensor, labels: torch.Tensor, start: int) -> list[dict]:
        # A little over 60 lines: the edge decision, one cloud request and its two outcomes (answers, or fallback
        # with the failure accounted per input) share the batch's bookkeeping arrays.
        from ..model.records import decisions_from

        t0 = time.perf_counter()
        level = self.audit.level if self.audit else None  # the audit's level decides this batch
        thr = self.audit.probe_thresholds if self.audit else self.thresholds
        r = self.edge.decide(images.to(self.device), thr, self.temperatures)
        t_edge = time.perf_counter()
        preds, decided = r.predictions.cpu().clone(), r.decided_at.cpu().clone()
        remaining = r.remaining.cpu().tolist()
        lat = [(t_edge - t0) * 1000.0] * len(labels)
        sent = [0] * len(labels)
        errors: dict[int, str] = {}
        if remaining:
            body = wire.encode(r.features, self.fingerprint, self.wire_codec, self.opt.compress)
            try:
                reply = self.cloud.infer(body, self.fingerprint, self.cfg.num_classes)
            except CloudError as e:
                tried = e.attempts > 0
                self.stats.requests += tried
                self.stats.failed_requests += tried
                self.stats.skipped_requests += not tried
                if self.opt.on_cloud_failure == "error":
                    raise e.with_context(f"input {start + remaining[0]}: ", "; use --on-cloud-failure fallback to "
                                         "answer with the edge's last exit instead") from None
                t_done = time.perf_counter()
                self.stats.attempts += e.attempts
                self.stats.retries += max(e.attempts - 1, 0)
                for i, b in zip(remaining, _split_bytes(len(body), len(remaining))):
                    decided[i] = FALLBACK
                    lat[i] = (t_done - t0) * 1000.0
                    sent[i] = b if tried else 0
                    errors[i] = str(e)
                if tried:
                    self.stats.request_bytes += len(body)
            else:
                t_done = time.perf_counter()
                s = self.stats
                s.requests += 1
                s.attempts += reply.attempts
                s.retries += reply.attempts - 1
                s.request_bytes += reply.request_bytes
                s.response_bytes += reply.response_bytes
                s.server_batch_samples.append(reply.batch_samples)
                s.server_batch_requests.append(reply.batch_requests)
                s.server_queue_ms.append(reply.queue_ms)
                s.server_compute_ms.append(reply.compute_ms)
                cloud_preds = reply.logits.argmax(1)
                for j, (i, b) in enumerate(zip(remaining, _split_bytes(len(body), len(remaining)))):
                    preds[i] = cloud_preds[j]
                    lat[i] = (t_done - t0) * 1000.0
                    sent[i] = b
        if self.audit:
            audited = _audit_batch(self, images, preds, decided, r.entropies.cpu(), start, level)
        decisions = decisions_from(Decisions(preds, decided, r.entropies.cpu()), labels, start)
        recs = [d.to_json(self.classes) for d in decisions]
        for i, rec in enumerate(recs):
            rec["latency_ms"] = round(lat[i], 3)
            rec["payload_bytes"] = sent[i]
            rec["engine"] = self.engine
            if i in errors:
                rec["error"] = errors[i]
            if self.audit:
                rec.update(audited[i])
        return recs

    def iter_records(self, images: torch.Tensor, labels: torch.Tensor, start: int = 0, progress: bool = False):
        """Yield one record per input, in order, processing ``batch_size`` inputs at a time."""
        from tqdm import tqdm

        bs = self.opt.batch_size
        t_run = time.perf_counter()
        with tqdm(total=len(labels), desc="edge", unit="img", disable=not progress, leave=False) as bar:
            for i in range(0, len(labels), bs):
                recs = self.run_batch(images[i:i + bs], labels[i:i + bs], start + i)
                self.stats.wall_s = time.perf_counter() - t_run
                bar.update(len(recs))
                yield from recs

    def run(self, images: torch.Tensor, labels: torch.Tensor, start: int = 0, progress: bool = False) -> list[dict]:
        return list(self.iter_records(images, labels, start, progress))


def _records_in_order(runner: EdgeRunner, inputs: Inputs, progress: bool, first: int = 0):
    """One record per input from input ``first`` on, in input order: the readable ones run (in batches), the others
    get their error."""
    if not inputs.errors:
        yield from runner.iter_records(inputs.images[first:], inputs.labels[first:], first, progress)
        return
    ok = [i for i in range(first, len(inputs.labels)) if i not in inputs.errors]
    run = runner.iter_records(inputs.images[ok], inputs.labels[ok], 0, progress)
    for i in range(first, len(inputs.labels)):
        if i in inputs.errors:
            yield unreadable_record(i, int(inputs.labels[i]), inputs.errors[i], runner.classes)
        else:
            rec = next(run)
            rec["index"] = i
            yield rec


# ---------------------------------------------------------------------------------------------- one call
def run_edge(checkpoint, inputs: Inputs, options: EdgeOptions, out=None, progress: bool = False,
             on_record=None, codec_calibration: torch.Tensor | None = None, policy=None,
             resume: bool = False) -> tuple[dict, list[dict]]:
    """Load the checkpoint, check the cloud, run every input, write ``out`` (JSONL, streamed), summarize.

    ``on_record(record)`` is called after each record is produced (progress, tests). ``codec_calibration``: the
    validation features a q codec chooses its clip ranges on (``codecs.get``). ``policy``: an exit policy to use
    instead of the checkpoint's (``--policy FILE``). ``resume``: keep the complete records already in ``out``
    and run only the inputs after them (``runtime/resume.py``); the summary covers every record."""
    model, meta = load_model(checkpoint)
    named = None
    if options.frame_codec not in codecs.V1_NAMES:
        named = codecs.get(options.codec, checkpoint=checkpoint, calibration=codec_calibration)
    runner = EdgeRunner(model, policy or meta["policy"], fingerprint(checkpoint), options,
                        classes=meta.get("data", {}).get("classes"), feature_codec=named)
    recs: list[dict] = []
    if resume:
        from .resume import read_done

        recs = read_done(out, inputs.labels, inputs.paths)
    with open(out, "a" if resume else "w") if out else contextlib.nullcontext() as f, runner.cloud:
        runner.check_cloud()
        for rec in _records_in_order(runner, inputs, progress, len(recs)):
            if inputs.paths is not None:
                rec["path"] = inputs.paths[rec["index"]]
            recs.append(rec)
            if f:  # streamed: whatever happens later, the records so far are on disk
                f.write(json.dumps(rec) + "\n")
                f.flush()
            if on_record:
                on_record(rec)
    report = energy_report(model.cfg)
    summary = edge_summary(recs, report, runner.thresholds, runner.stats, options, inputs.labelled)
    summary["engine"] = runner.engine
    if runner.audit:
        summary.update(runner.audit.summary(), audit_cloud_uj=runner.audit.audits * report.cloud_uj)
    return summary, recs
