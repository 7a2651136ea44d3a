"""HTTP client of ``hybridexit serve`` on the standard library: wire frames, bearer token, TLS (the system's CAs
or ``--ca``), bounded retries with exponential backoff, and a cool-down after a request exhausts them (the main
package's ``runtime/client.py`` semantics)."""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import frames
from .errors import ConfigError, HybridExitError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class CloudError(HybridExitError):
    """The cloud could not answer. ``attempts``: how many times the request was sent (0: not tried)."""

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message)
        self.attempts = attempts


class CloudUnavailable(CloudError):
    """No answer after the allowed retries (down, unreachable, overloaded, timing out)."""


class CloudRejected(CloudError):
    """The cloud refused the request (4xx) or its certificate: retrying will not help."""

    def __init__(self, message: str, status: int, code: str, attempts: int = 1):
        super().__init__(message, attempts)
        self.status, self.code = status, code


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tls_context(ca: str | None = None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot use CA certificate {ca} ({e}): a PEM file expected") from None


@dataclass
class Reply:
    logits: list[list[float]]
    request_bytes: int
    response_bytes: int
    attempts: int
    batch_samples: int
    batch_requests: int
    queue_ms: float
    compute_ms: float


class CloudClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 10.0, retries: int = 2,
                 retry_backoff_ms: float = 100.0, cooldown_s: float = 5.0, ca: str | None = None,
                 insecure: bool = False):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"cloud URL {url!r} must start with http:// or https://")
        if token and u.scheme == "http" and not is_loopback(u.hostname) and not insecure:
            raise ConfigError(f"{url} is plain HTTP to another machine: the bearer token and the features would cross "
                              "the network in clear; use https:// (with --ca if needed), or pass --insecure on a "
                              "network you trust")
        self.url, self.host, self.tls = url.rstrip("/"), u.hostname, u.scheme == "https"
        self.port = u.port or (443 if self.tls else 80)
        self.base = u.path.rstrip("/")
        self.ctx = tls_context(ca) if self.tls else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s, self.retries, self.backoff_s, self.cooldown_s = timeout_s, retries, retry_backoff_ms / 1e3, cooldown_s
        self._conn = None
        self._down_until, self._last_failure = 0.0, ""
        self._lock = threading.Lock()

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _connection(self):
        if self._conn is None:
            if self.tls:
                c = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=self.ctx)
            else:
                c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            c.connect()
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = c
        return self._conn

    def _once(self, method: str, path: str, body: bytes | None, headers: dict):
        conn = self._connection()
        try:
            conn.request(method, self.base + path, body=body, headers={**self.headers, **headers})
            r = conn.getresponse()
            return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
        except BaseException:
            self.close()
            raise

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """One logical request with retries: (status, headers, body, attempts)."""
        now = time.monotonic()
        if now < self._down_until:
            raise CloudUnavailable(f"cloud considered down for {self._down_until - now:.1f} s more after: "
                                   f"{self._last_failure}", attempts=0)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                status, h, data = self._once(method, path, body, headers or {})
            except ssl.SSLCertVerificationError as e:
                raise CloudRejected(f"TLS: cannot verify the certificate of {self.url} ({e}); pass --ca with the CA "
                                    "that signed it", 0, "tls_verify_failed", attempt + 1) from None
            except (OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e or 'no detail'}"
                continue
            if status < 400:
                return status, h, data, attempt + 1
            try:
                j = json.loads(data)
                code, detail = str(j.get("error", f"http_{status}")), str(j.get("detail", ""))
            except ValueError:
                code, detail = f"http_{status}", data[:200].decode(errors="replace")
            if status in RETRY_STATUS:
                last = f"HTTP {status} {code}: {detail}"
                continue
            raise CloudRejected(f"cloud refused the request: HTTP {status} {code}: {detail}", status, code, attempt + 1)
        with self._lock:
            self._down_until = time.monotonic() + self.cooldown_s
            self._last_failure = f"{self.url}{path}: {last} ({self.retries + 1} attempts)"
        raise CloudUnavailable(f"no answer from {self.url}{path} after {self.retries + 1} attempts: {last}",
                               attempts=self.retries + 1)

    def info(self) -> dict:
        return json.loads(self.request("GET", "/v1/info")[2])

    def infer(self, body: bytes, fingerprint: str, n: int, num_classes: int) -> Reply:
        _, h, data, attempts = self.request("POST", "/v1/infer", body, {"Content-Type": frames.CONTENT_TYPE})
        try:
            logits = frames.decode_logits(data, fingerprint, n, num_classes)
        except frames.WireError as e:
            raise CloudRejected(f"the cloud's answer is not a valid frame for this request: {e}", 200, "bad_frame",
                                attempts) from None
        return Reply(logits, len(body), len(data), attempts, int(h.get("x-hybridexit-batch-samples", n)),
                     int(h.get("x-hybridexit-batch-requests", 1)), float(h.get("x-hybridexit-queue-ms", "nan")),
                     float(h.get("x-hybridexit-compute-ms", "nan")))
