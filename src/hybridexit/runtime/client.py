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
import ipaddress
import math
import socket
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

from ..device import pick_device
from ..errors import ConfigError, DatasetError, HybridExitError
from ..hybrid import FALLBACK, Decisions, resolve_thresholds
from . import audit, wire

RAW_IMAGE_BYTES = 3 * 32 * 32  # a CIFAR image as uint8: what sending the input itself would cost
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
FAILURE_POLICIES = ("fallback", "error")


class CloudError(HybridExitError):
    """The cloud could not answer. ``attempts``: how many times the request was sent (0: not tried)."""

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message)
        self.attempts = attempts

    def with_context(self, prefix: str, suffix: str = "") -> CloudError:
        e = CloudError.__new__(type(self))
        e.__dict__.update(self.__dict__)
        e.args = (f"{prefix}{self}{suffix}",)
        return e


class CloudDownWarning(UserWarning):
    """The cloud could not be reached; the edge goes on under the fallback policy."""


class CloudUnavailable(CloudError):
    """The cloud did not answer after the allowed retries (down, unreachable, overloaded, timing out)."""


class CloudRejected(CloudError):
    """The cloud refused the request (4xx): wrong token, other model, bad frame. Retrying will not help."""

    def __init__(self, message: str, status: int, code: str, attempts: int = 1):
        super().__init__(message, attempts)
        self.status, self.code = status, code


@dataclass(frozen=True)
class EdgeOptions:
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
    device: str | None = None
    ca: str | None = None  # CA certificate (PEM) that signed an https server's certificate; None: the system's
    engine: str = "auto"  # the edge half's engine (hybridexit.engines): auto (the fastest here), torch, onnx, packed
    audit_rate: float = 0.0  # share of exited inputs also sent to the cloud to measure disagreement (runtime/audit.py)
    audit_eps: float | None = None  # the disagreement the audit holds the exits to (default: the policy's EPS)
    audit_seed: int = 0
    audit_burst_rate: float | None = None  # audit rate during a drift burst (runtime/audit.py)
    insecure: bool = False  # allow the token over plain HTTP to a non-loopback address

    def __post_init__(self):
        from ..codecs import V1_NAMES, check_name

        check_name(self.codec)  # fp32/fp16/int8 (with --compress), or a named codec (hybridexit.codecs)
        if self.compress and self.codec not in V1_NAMES:
            raise ConfigError(f"codec {self.codec} codes its own payload: --compress applies to fp32/fp16/int8 only")
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


@dataclass
class CloudReply:
    logits: torch.Tensor
    request_bytes: int
    response_bytes: int
    attempts: int
    batch_samples: int  # samples in the server's forward pass that carried this request
    batch_requests: int
    queue_ms: float
    compute_ms: float


def _error_text(r) -> tuple[str, str]:
    try:
        j = r.json()
        return str(j.get("error", f"http_{r.status_code}")), str(j.get("detail", ""))
    except ValueError:  # not JSON: a proxy's error page, say
        return f"http_{r.status_code}", r.text[:200]


def tls_context(ca: str | None = None) -> ssl.SSLContext:
    """Verification of https servers: the system's CA certificates, or only ``ca`` (a PEM file) when given."""
    try:
        return ssl.create_default_context(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot use CA certificate {ca} ({e}): a PEM file expected") from None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def protocol_mismatch(url: str, timeout_s: float = 3.0) -> str | None:
    """Why ``url`` cannot work when its server speaks the other protocol: an ``http://`` URL whose port completes a
    TLS handshake, or an ``https://`` URL whose port answers plain HTTP. None when neither is seen (down, or another
    fault: the caller's own error stands)."""
    u = urlsplit(url)
    tls = u.scheme == "https"
    try:
        port = u.port or (443 if tls else 80)
    except ValueError:
        return None
    other = url.replace(f"{u.scheme}://", "http://" if tls else "https://", 1)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout_s) as s:
            if tls:
                s.sendall(b"GET /healthz HTTP/1.0\r\nHost: probe\r\n\r\n")
                if s.recv(5) == b"HTTP/":
                    return f"{u.hostname}:{port} answers plain HTTP, not TLS: use {other} (or serve with --tls-cert)"
                return None
            probe = ssl.create_default_context()
            probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE  # only: does it speak TLS at all?
            with probe.wrap_socket(s, server_hostname=u.hostname):
                return f"{u.hostname}:{port} speaks TLS: use {other}"
    except (OSError, ssl.SSLError):
        return None


def _root(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _is_certificate_error(e: BaseException) -> bool:
    return isinstance(_root(e), ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e)


class CloudClient:
    """HTTP client of the cloud server: wire frames, bearer token, bounded retries, cool-down after failure."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 10.0, retries: int = 2,
                 retry_backoff_ms: float = 100.0, cooldown_s: float = 5.0, ca: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # TCP_NODELAY: request headers and body are separate writes; Nagle + delayed ACK would stall the body
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                                        verify=tls_context(ca))
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s),
                                  transport=transport)
        self._httpx = httpx
        self.retries, self.backoff_s, self.cooldown_s = retries, retry_backoff_ms / 1000.0, cooldown_s
        self._down_until = 0.0
        self._last_failure = ""
        self._lock = threading.Lock()

    def close(self):
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, **kw):
        """One logical request with retries; returns (response, attempts). Raises CloudUnavailable/Rejected."""
        now = time.monotonic()
        if now < self._down_until:
            raise CloudUnavailable(f"cloud considered down for {self._down_until - now:.1f} s more after: "
                                   f"{self._last_failure}", attempts=0)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = self._http.request(method, path, **kw)
            except self._httpx.TransportError as e:
                if _is_certificate_error(e):  # retrying cannot fix a certificate: stop, whatever the policy
                    raise CloudRejected(f"TLS: cannot verify the certificate of {self.url} ({_root(e)}); pass --ca "
                                        f"with the CA that signed it", 0, "tls_verify_failed", attempt + 1) from None
                last = f"{type(e).__name__}: {e or 'no detail'}"
                continue
            if r.status_code < 400:
                return r, attempt + 1
            code, detail = _error_text(r)
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code} {code}: {detail}"
                continue
            raise CloudRejected(f"cloud refused the request: HTTP {r.status_code} {code}: {detail}",
                                r.status_code, code, attempt + 1)
        with self._lock:
            self._down_until = time.monotonic() + self.cooldown_s
            self._last_failure = f"{self.url}{path}: {last} ({self.retries + 1} attempts)"
        raise CloudUnavailable(f"no answer from {self.url}{path} after {self.retries + 1} attempts: {last}",
                               attempts=self.retries + 1)

    def health(self) -> bool:
        try:
            return self._http.get("/healthz").status_code == 200
        except self._httpx.TransportError:
            return False

    def info(self) -> dict:
        r, _ = self._request("GET", "/v1/info")
        return r.json()

    def stats(self) -> dict:
        r, _ = self._request("GET", "/v1/stats")
        return r.json()

    def infer(self, body: bytes, fingerprint: str, num_classes: int, headers: dict | None = None) -> CloudReply:
        r, attempts = self._request("POST", "/v1/infer", content=body,
                                    headers={"Content-Type": wire.CONTENT_TYPE, **(headers or {})})
        n = wire.parse_header(body).shape[0]
        try:
            logits = wire.decode(r.content, fingerprint, (n, num_classes))
        except wire.WireError as e:
            raise CloudRejected(f"the cloud's answer is not a valid frame for this request: {e}", r.status_code,
                                e.code, attempts) from None
        h = r.headers
        return CloudReply(logits, len(body), len(r.content), attempts, int(h.get("x-hybridexit-batch-samples", n)),
                          int(h.get("x-hybridexit-batch-requests", 1)), float(h.get("x-hybridexit-queue-ms", "nan")),
                          float(h.get("x-hybridexit-compute-ms", "nan")))


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
    from ..hybrid import CLOUD

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
        self.wire_codec = feature_codec if feature_codec is not None else options.codec
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
        if "codecs" in info and self.opt.codec not in info["codecs"]:
            raise CloudRejected(f"the cloud decodes the codecs {', '.join(info['codecs'])}, not {self.opt.codec}: run "
                                f"the edge with one of them", 409, wire.CodecMismatch.code)
        return info

    def run_batch(self, images: torch.Tensor, labels: torch.Tensor, start: int) -> list[dict]:
        # A little over 60 lines: the edge decision, one cloud request and its two outcomes (answers, or fallback
        # with the failure accounted per input) share the batch's bookkeeping arrays.
        from ..records import decisions_from

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


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    labels: torch.Tensor  # int64 (N,), -1 when unknown
    paths: list[str] | None = None
    description: str = ""
    errors: dict[int, str] = field(default_factory=dict)  # index -> why that input could not be read
    skipped: list[str] = field(default_factory=list)  # files of an image folder that are not images (not inputs)

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).all())

    def head(self, n: int | None) -> Inputs:
        """The first ``n`` inputs (all when None)."""
        if n is None:
            return self
        return Inputs(self.images[:n], self.labels[:n], self.paths[:n] if self.paths is not None else None,
                      self.description, {i: e for i, e in self.errors.items() if i < n}, self.skipped)

    @property
    def readable(self) -> list[int]:
        """Indices of the inputs that could be read."""
        return [i for i in range(len(self.labels)) if i not in self.errors]

    def folder_summary(self) -> dict:
        """What an image folder held besides the answered inputs: unreadable files (each with its reason) and files
        skipped as not images; empty for a dataset split."""
        if self.paths is None:
            return {}
        return {"unreadable": [{"path": self.paths[i], "error": e} for i, e in sorted(self.errors.items())],
                "skipped_files": len(self.skipped), "skipped_examples": self.skipped[:5]}


def inputs_from_folder(folder, classes: list[str] | None, size: int = 32) -> Inputs:
    """A folder of image files: ``FOLDER/*.png`` (unlabelled) or ``FOLDER/<class>/*.png`` with class names from
    the checkpoint (labelled); any format Pillow reads. A file that cannot be read stays an input, with its reason
    in ``errors``; files that are not images (by extension) are no inputs, listed in ``skipped``."""
    from ..data import is_image_file, load_image_files

    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"--images {root}: not a folder")
    flat = sorted(p for p in root.iterdir() if is_image_file(p))
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and any(is_image_file(p) for p in d.iterdir()))
    if flat and subdirs:
        raise DatasetError(f"{root} has both images and class folders with images: use one layout, "
                           f"FOLDER/*.png (unlabelled) or FOLDER/<class>/*.png (labelled)")
    if subdirs:
        known = list(classes or [])
        paths, labels = [], []
        for d in subdirs:
            if d.name not in known:
                raise DatasetError(f"{d}: {d.name!r} is not a class of this model (classes: {', '.join(known)}); "
                                   f"put unlabelled images directly in {root}")
            for p in sorted(q for q in d.iterdir() if is_image_file(q)):
                paths.append(p)
                labels.append(known.index(d.name))
    elif flat:
        paths, labels = flat, [-1] * len(flat)
    else:
        raise DatasetError(f"no images in {root} (any format Pillow reads: .png, .jpg, .gif, .tif, .webp ...)")
    taken = set(paths)
    skipped = sorted(str(q.relative_to(root)) for d in [root, *subdirs] for q in d.iterdir()
                     if q.is_file() and q not in taken)
    images = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    errors = {}
    for i, p in enumerate(paths):
        try:
            images[i] = load_image_files([p], size)[0]
        except DatasetError as e:
            errors[i] = str(e)
    return Inputs(images, torch.tensor(labels, dtype=torch.long), [str(p.relative_to(root)) for p in paths],
                  f"images in {root}", errors, skipped)


def unreadable_record(index: int, label: int, error: str, classes: list[str] | None = None) -> dict:
    """The record of an input that could not be read: no prediction, the reason in ``error``."""
    rec = {"index": index, "label": label, "prediction": None, "decided_at": "unreadable", "entropies": []}
    if classes:
        rec["prediction_name"] = None
        rec["label_name"] = classes[label] if 0 <= label < len(classes) else None
    return {**rec, "latency_ms": 0.0, "payload_bytes": 0, "error": error}


def _records_in_order(runner: EdgeRunner, inputs: Inputs, progress: bool):
    """One record per input, in input order: the readable ones run (in batches), the others get their error."""
    if not inputs.errors:
        yield from runner.iter_records(inputs.images, inputs.labels, 0, progress)
        return
    ok = [i for i in range(len(inputs.labels)) if i not in inputs.errors]
    run = runner.iter_records(inputs.images[ok], inputs.labels[ok], 0, progress)
    for i in range(len(inputs.labels)):
        if i in inputs.errors:
            yield unreadable_record(i, int(inputs.labels[i]), inputs.errors[i], runner.classes)
        else:
            rec = next(run)
            rec["index"] = i
            yield rec


# ---------------------------------------------------------------------------------------------- summary
def _pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def edge_summary(records: list[dict], report, thresholds, stats: EdgeStats | None = None,
                 options: EdgeOptions | None = None, labelled: bool = True) -> dict:
    """``records.summarize`` plus bytes, latency and what the cloud did. ``inputs`` counts every input,
    ``unreadable_inputs`` those that could not be read (no answer: left out of every other figure), and
    ``fallback_inputs`` those the edge answered alone because the cloud failed. Fallbacks are no saving: they
    needed the cloud, so ``expected_uj`` and ``reduction`` charge them its cost (the energy of the system as
    designed at the measured exit rates); ``spent_uj`` is what was actually computed per input."""
    from ..records import Decision, summarize

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
        "raw_image_bytes": RAW_IMAGE_BYTES,
        "latency_ms_p50": _pct(lat, 50),
        "latency_ms_p95": _pct(lat, 95),
        "latency_ms_edge_p50": _pct(at_edge, 50),
        "latency_ms_edge_p95": _pct(at_edge, 95),
        "latency_ms_offloaded_p50": _pct(offl, 50),
        "latency_ms_offloaded_p95": _pct(offl, 95),
    })
    if options is not None:
        s.update({"codec": options.codec, "compressed": options.compress, "batch_size": options.batch_size,
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


# ---------------------------------------------------------------------------------------------- one call
def run_edge(checkpoint, inputs: Inputs, options: EdgeOptions, out=None, progress: bool = False,
             on_record=None, codec_calibration: torch.Tensor | None = None, policy=None) -> tuple[dict, list[dict]]:
    """Load the checkpoint, check the cloud, run every input, write ``out`` (JSONL, streamed), summarize.

    ``on_record(record)`` is called after each record is produced (progress, tests). ``codec_calibration``: the
    validation features a q codec chooses its clip ranges on (``codecs.get``). ``policy``: an exit policy to use
    instead of the checkpoint's (``--policy FILE``)."""
    import json

    from .. import codecs
    from ..checkpoint import fingerprint, load_model
    from ..energy import energy_report

    model, meta = load_model(checkpoint)
    named = None
    if options.codec not in codecs.V1_NAMES:
        named = codecs.get(options.codec, checkpoint=checkpoint, calibration=codec_calibration)
    runner = EdgeRunner(model, policy or meta["policy"], fingerprint(checkpoint), options,
                        classes=meta.get("data", {}).get("classes"), feature_codec=named)
    recs: list[dict] = []
    with open(out, "w") if out else contextlib.nullcontext() as f, runner.cloud:
        runner.check_cloud()
        for rec in _records_in_order(runner, inputs, progress):
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
