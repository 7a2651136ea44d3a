"""The edge's HTTP transport to the cloud: one client per run (keep-alive, token, TLS with a given CA), retries with
exponential backoff on transient failures, a cool-down after the cloud is found down, and typed errors
(``CloudUnavailable``: no answer after the retries; ``CloudRejected``: a 4xx, retrying will not help)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch

from ..errors import ConfigError, HybridExitError
from . import wire

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


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

    def health(self, timeout_s: float | None = None) -> bool:
        """Whether the server answers ``/healthz`` (within ``timeout_s`` when given, else the client's timeout)."""
        kw = {} if timeout_s is None else {"timeout": self._httpx.Timeout(timeout_s)}
        try:
            return self._http.get("/healthz", **kw).status_code == 200
        except self._httpx.TransportError:
            return False

    def info(self) -> dict:
        r, _ = self._request("GET", "/v1/info")
        return r.json()

    def stats(self) -> dict:
        r, _ = self._request("GET", "/v1/stats")
        return r.json()

    def infer(self, body: bytes, fingerprint: str, num_classes: int, headers: dict | None = None,
              timeout_s: float | None = None) -> CloudReply:
        """One inference request; ``timeout_s`` replaces the client's timeout for it (the adaptive edge's budget)."""
        kw = {} if timeout_s is None else {"timeout": self._httpx.Timeout(timeout_s)}
        r, attempts = self._request("POST", "/v1/infer", content=body,
                                    headers={"Content-Type": wire.CONTENT_TYPE, **(headers or {})}, **kw)
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
