"""The cloud server: the CloudNet of a checkpoint behind HTTP (FastAPI on uvicorn), with dynamic batching.

Stateless: a request carries everything it needs (a wire frame of edge features with the model fingerprint), so
any number of replicas can sit behind a load balancer. Concurrent requests are queued and grouped into one
forward pass of at most ``max_batch`` samples, waiting at most ``max_wait_ms`` after the first one arrived for
others to join; while a forward pass runs, new requests gather for the next one.

Endpoints (docs/wire-format.md): ``GET /healthz`` (no token), ``GET /v1/info``, ``GET /v1/stats`` and
``POST /v1/infer`` (bearer token when the server has one). Every refused request gets a 4xx JSON body
``{"error": CODE, "detail": MESSAGE}``; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import ssl
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..codecs import HeldCodecs, receivable
from ..device import pick_device
from ..errors import HybridExitError
from . import wire
from .auth import TOKEN_ENV
from .transport import is_loopback

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: same format, same --log-level


class ServerConfigError(HybridExitError):
    """The server cannot start with these settings."""


@dataclass(frozen=True)
class ServerSettings:
    max_batch: int = 64  # samples per forward pass
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_request_bytes: int = 8 * 1024 * 1024  # body limit, and limit on the decoded tensor
    request_timeout_s: float = 30.0  # reading the body + queueing + computing, per request
    max_queue_samples: int = 4096  # samples waiting; beyond this, 503 (overloaded)
    token: str | None = None
    idle_timeout_s: float = 15.0  # a connection with no request under way (new, or kept alive) is closed after this
    header_timeout_s: float = 10.0  # from a request's first byte to its last header line

    def __post_init__(self):
        if self.max_batch < 1:
            raise ServerConfigError(f"max_batch={self.max_batch}: must be at least 1")
        if self.max_wait_ms < 0:
            raise ServerConfigError(f"max_wait_ms={self.max_wait_ms}: must be >= 0")
        if self.max_request_bytes < 1024:
            raise ServerConfigError(f"max_request_bytes={self.max_request_bytes}: must be at least 1024")
        if self.request_timeout_s <= 0:
            raise ServerConfigError(f"request_timeout_s={self.request_timeout_s}: must be > 0")
        if self.max_queue_samples < self.max_batch:
            raise ServerConfigError(f"max_queue_samples={self.max_queue_samples} must be >= max_batch={self.max_batch}")
        if not (self.idle_timeout_s > 0 and self.header_timeout_s > 0):
            raise ServerConfigError("idle_timeout_s and header_timeout_s must be > 0")
        if self.token is not None and len(self.token) < 8:
            raise ServerConfigError("the token must be at least 8 characters (e.g. `openssl rand -hex 16`)")


class CloudModel:
    """The cloud half of a checkpoint, ready to serve: CloudNet in eval mode, fingerprint, shapes."""

    def __init__(self, cloud, fingerprint: str, name: str = "", device=None):
        self.device = pick_device(device or None)
        self.net = cloud.eval().to(self.device)
        self.fingerprint = fingerprint
        self.feature_shape = tuple(cloud._in_shape)
        self.num_classes = cloud.cfg.num_classes
        self.name = name or cloud.cfg.name
        from ..model.energy import energy_report

        self.cloud_uj = energy_report(cloud.cfg).cloud_uj  # per sample: what an audit costs here
        self.codecs: HeldCodecs = HeldCodecs()  # learned codecs of the checkpoint (hybridexit.codecs.registry.held_codecs)
        self.required_codec: str | None = None  # a cloud half trained behind a learned codec reads only it
        self.boundary = cloud.first_block  # where the checkpoint hands off
        self.whole = None  # the whole network (from_checkpoint): features are accepted at any block boundary
        self._halves = {self.boundary: self.net}

    @classmethod
    def from_checkpoint(cls, path, device=None) -> CloudModel:
        from ..codecs import held_codecs, required_codec
        from ..model.checkpoint import fingerprint, load_model

        model, _ = load_model(path)
        _, cloud = model.split()
        out = cls(cloud, fingerprint(path), model.cfg.name, device)
        out.codecs, out.required_codec = held_codecs(path), required_codec(path)
        out.whole = model.eval()
        return out

    @property
    def boundaries(self) -> list[int]:
        """The block boundaries this server accepts features at."""
        if self.whole is None or self.required_codec is not None:
            return [self.boundary]
        return list(range(len(self.whole.blocks) + 1))

    def boundary_of(self, header: wire.Header) -> int:
        """The boundary a frame's features enter at (its header's, else the checkpoint's); refused if not served."""
        b = self.boundary if header.boundary is None else header.boundary
        if b not in self.boundaries:
            why = (f"a cloud half trained behind the codec {self.required_codec!r} takes features at its boundary "
                   f"only" if self.required_codec else f"this server accepts boundaries {self.boundaries[0]}.."
                   f"{self.boundaries[-1]}")
            raise wire.WrongShape(f"features at block boundary {b} refused: {why} (the checkpoint's is "
                                  f"{self.boundary})")
        return b

    def feature_shape_at(self, boundary: int) -> tuple[int, int, int]:
        from ..model.resnet import feature_shape_at

        return self.feature_shape if boundary == self.boundary else feature_shape_at(self.whole.cfg, boundary)

    def half(self, boundary: int):
        """The cloud half from ``boundary`` on (built from the whole network once, on first use)."""
        if boundary not in self._halves:
            self._halves[boundary] = self.whole.split(at=boundary)[1].eval().to(self.device)
        return self._halves[boundary]

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, max_batch: int, boundary: int | None = None) -> torch.Tensor:
        net = self.net if boundary is None or boundary == self.boundary else self.half(boundary)
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        outs = [net(x[i:i + max_batch]) for i in range(0, len(x), max_batch)]
        return torch.cat(outs).float().cpu()


class RequestFailed(Exception):
    """An HTTP error answer: status, error code, message."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


@dataclass
class _Item:
    x: torch.Tensor
    future: asyncio.Future
    enqueued: float
    boundary: int | None = None  # requests at different block boundaries never share a forward pass

    @property
    def n(self) -> int:
        return len(self.x)


@dataclass
class BatchInfo:
    samples: int  # samples in the forward pass this request was part of
    requests: int  # requests in that forward pass
    queue_ms: float
    compute_ms: float


@dataclass
class Stats:
    requests: int = 0
    samples: int = 0
    forwards: int = 0
    refused: Counter = field(default_factory=Counter)
    batch_samples: Counter = field(default_factory=Counter)  # forward-pass size -> count
    audit_requests: int = 0  # requests an edge marked as audits (runtime/audit.py)
    audit_samples: int = 0
    audit_disagreements: int = 0  # audited samples whose edge answer differs from this server's
    audit_request_bytes: int = 0
    audit_cloud_uj: float = 0.0  # energy model: audit samples x the cloud half's energy per sample
    audit_levels: Counter = field(default_factory=Counter)  # "level/top" the edge was at -> audit requests

    def to_dict(self) -> dict:
        d = asdict(self)
        d["refused"] = dict(self.refused)
        d["audit_levels"] = dict(self.audit_levels)
        d["batch_samples"] = {str(k): v for k, v in sorted(self.batch_samples.items())}
        return d


class Batcher:
    """Groups queued requests into forward passes of at most ``max_batch`` samples (one at a time, off the
    event loop, in a single worker thread)."""

    def __init__(self, model: CloudModel, settings: ServerSettings, stats: Stats):
        self.model, self.s, self.stats = model, settings, stats
        self._pending: deque[_Item] = deque()
        self._pending_samples = 0
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cloudnet")
        self._task: asyncio.Task | None = None

    def start(self):
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    def submit(self, x: torch.Tensor, boundary: int | None = None) -> asyncio.Future:
        if self._pending_samples + len(x) > self.s.max_queue_samples:
            raise RequestFailed(503, "overloaded", f"{self._pending_samples} samples already queued "
                                f"(limit {self.s.max_queue_samples}); retry later", {"Retry-After": "1"})
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(x, fut, time.perf_counter(), boundary))
        self._pending_samples += len(x)
        self._wake.set()
        return fut

    def _take(self) -> list[_Item]:
        items, n = [], 0
        while self._pending and (not items or (n + self._pending[0].n <= self.s.max_batch
                                               and self._pending[0].boundary == items[0].boundary)):
            it = self._pending.popleft()
            self._pending_samples -= it.n
            if it.future.done():  # timed out or abandoned while queued
                continue
            items.append(it)
            n += it.n
        return items

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            deadline = self._pending[0].enqueued + self.s.max_wait_ms / 1000.0
            while self._pending_samples < self.s.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            items = self._take()
            if not items:
                continue
            x = torch.cat([it.x for it in items]) if len(items) > 1 else items[0].x
            t0 = time.perf_counter()
            try:
                logits = await loop.run_in_executor(self._pool, self.model.forward, x, self.s.max_batch,
                                                    items[0].boundary)
            except Exception as e:  # noqa: BLE001 - a bug, not bad input: answer 500 to this batch and keep serving
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            t1 = time.perf_counter()
            self.stats.forwards += 1
            self.stats.batch_samples[len(x)] += 1
            start = 0
            for it in items:
                if not it.future.done():
                    info = BatchInfo(len(x), len(items), (t0 - it.enqueued) * 1000.0, (t1 - t0) * 1000.0)
                    it.future.set_result((logits[start:start + it.n], info))
                start += it.n


# long: the FastAPI routes are closures over one batcher, one model and the settings; each route is short
def create_app(model: CloudModel, settings: ServerSettings, on_ready=None):
    """The FastAPI application serving ``model``. ``on_ready()`` is called once the batcher runs."""
    # Long by nature: the routes and error handlers are closures over one app's model, settings, stats and batcher.

    stats = Stats()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        b = Batcher(model, settings, stats)
        b.start()
        state["batcher"] = b
        if on_ready:
            on_ready()
        yield
        await b.stop()

    app = FastAPI(title="hybridexit cloud", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    token = settings.token.encode() if settings.token else None

    def error(status: int, code: str, detail: str, headers: dict | None = None):
        if status < 500:
            stats.refused[code] += 1
        return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(RequestFailed)
    async def _failed(request, e: RequestFailed):
        return error(e.status, e.code, e.detail, e.headers)

    @app.exception_handler(wire.WireError)
    async def _wire(request, e: wire.WireError):
        return error(e.http_status, e.code, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error(e.status_code, f"http_{e.status_code}", str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error(422, "invalid_request", str(e))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return error(500, "internal", f"{type(e).__name__}: {e}")

    def check_token(request: Request):
        if token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise RequestFailed(401, "missing_token", "this server needs `Authorization: Bearer <token>` "
                                "(edge: --token-file or HYBRIDEXIT_TOKEN)", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(value.strip().encode(), token):
            raise RequestFailed(401, "wrong_token", "the bearer token is wrong: use the token the server was "
                                "started with", {"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        limit = settings.max_request_bytes
        cl = request.headers.get("content-length")
        if cl is not None:
            if not cl.isdigit():
                raise RequestFailed(400, "bad_content_length", f"Content-Length {cl!r} is not a number")
            if int(cl) > limit:
                raise RequestFailed(413, "too_large", f"body of {cl} bytes is over the limit of {limit} bytes: "
                                    f"send fewer samples per request")
        buf = bytearray()
        try:
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise RequestFailed(413, "too_large", f"body is over the limit of {limit} bytes: send fewer "
                                        f"samples per request")
        except ClientDisconnect:  # the client went away: one line in the log, nothing to answer
            peer = f"{request.client.host}:{request.client.port}" if request.client else "a client"
            log.warning("%s disconnected after %d of %s body bytes; request dropped", peer, len(buf), cl or "?")
            raise RequestFailed(400, "client_disconnected", "the client disconnected before its body was complete") \
                from None
        return bytes(buf)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "protocol": wire.PROTOCOL_VERSION}

    @app.get("/v1/info")
    async def info(request: Request):
        check_token(request)
        return {"model": model.name, "fingerprint": model.fingerprint, "protocol": wire.PROTOCOL_VERSION,
                "feature_shape": list(model.feature_shape), "num_classes": model.num_classes,
                "boundary": model.boundary, "boundaries": model.boundaries,
                "codecs": [model.required_codec] if model.required_codec else receivable(model.codecs),
                "compression": ["zstd"], "device": str(model.device),
                "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                "max_request_bytes": settings.max_request_bytes, "request_timeout_s": settings.request_timeout_s}

    @app.get("/v1/stats")
    async def get_stats(request: Request):
        check_token(request)
        return stats.to_dict()

    @app.post("/v1/infer")
    async def infer(request: Request):
        check_token(request)
        t_start = time.perf_counter()
        budget = settings.request_timeout_s
        try:
            body = await asyncio.wait_for(read_body(request), budget)
        except asyncio.TimeoutError:
            raise RequestFailed(408, "timeout", f"the body did not arrive within {budget} s") from None
        boundary = model.boundary_of(wire.parse_header(body))
        x = wire.decode(body, fingerprint=model.fingerprint, shape=(None, *model.feature_shape_at(boundary)),
                        max_decoded_bytes=settings.max_request_bytes, codecs=model.codecs,
                        require_codec=model.required_codec)
        fut = state["batcher"].submit(x, boundary)
        left = budget - (time.perf_counter() - t_start)
        try:
            logits, binfo = await asyncio.wait_for(fut, max(left, 0.001))
        except asyncio.TimeoutError:
            raise RequestFailed(503, "timeout", f"no answer within the request timeout of {budget} s "
                                "(server overloaded); retry later", {"Retry-After": "1"}) from None
        if not bool(torch.isfinite(logits).all()):  # finite features so large that the float half overflows
            raise RequestFailed(422, "non_finite_output", "the cloud half's output for these features is not finite: "
                                "they are far outside what the edge half produces (check the sender and its codec)")
        stats.requests += 1
        stats.samples += len(x)
        if request.headers.get("x-hybridexit-audit") is not None:
            from .audit import count_audit

            count_audit(stats, request.headers, logits, len(body), model.cloud_uj)
        out = wire.encode(logits, model.fingerprint, "fp32")
        return Response(out, media_type=wire.CONTENT_TYPE, headers={
            "X-Hybridexit-Batch-Samples": str(binfo.samples), "X-Hybridexit-Batch-Requests": str(binfo.requests),
            "X-Hybridexit-Queue-Ms": f"{binfo.queue_ms:.3f}", "X-Hybridexit-Compute-Ms": f"{binfo.compute_ms:.3f}"})

    app.state.stats = stats
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now (so ``port=0`` gives a known free port and errors come before anything starts)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServerConfigError(f"cannot resolve host {host!r} ({e})") from None
    family, _, _, _, addr = infos[0]
    # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted sockets only then; without it Nagle's
    # algorithm and delayed ACKs add ~40 ms to every request after the first on a keep-alive connection
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ServerConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def check_bind(host: str, token: str | None) -> None:
    if token is None and not is_loopback(host):
        raise ServerConfigError(
            f"refusing to listen on non-loopback address {host!r} without a token: pass --token-file or set "
            f"{TOKEN_ENV} (or bind 127.0.0.1)")


def check_tls(cert, key) -> None:
    """Load the certificate chain and key now, so a wrong file stops the start-up with one line."""
    if key is not None and cert is None:
        raise ServerConfigError("--tls-key needs --tls-cert (the certificate chain, PEM)")
    if cert is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ServerConfigError(f"cannot use TLS certificate {cert}{f' with key {key}' if key else ''}: {e} "
                                f"(PEM files expected; the key may also be inside the certificate file)") from None


def url_of(sock: socket.socket, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _uvicorn_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, stopped alike by SIGINT and SIGTERM: it stops accepting, lets the requests in flight
        finish (their batches still run), shuts the batcher down and returns. uvicorn itself re-raises the signal
        afterwards, which on SIGTERM kills the process before ``serve`` can say it stopped."""

        stop_signal: int | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    captured = getattr(self, "_captured_signals", [])
                    self.stop_signal = captured[0] if captured else None
                    captured.clear()

    return Server


def _timed_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with the two timeouts it lacks. uvicorn closes a kept-alive connection that stays idle
    after a response (``timeout_keep_alive``), but not a new connection that never sends a byte, nor one that sends
    part of a request's headers and stops: each would hold one of ``limit_concurrency``'s slots for ever. Here a new
    connection is idle from the start (the same ``timeout_keep_alive`` applies), and once a request's first byte has
    arrived its headers must be complete within ``header_timeout_s`` (slow bytes do not extend it). The body has
    the request timeout (``read_body``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)  # (cancels the idle timer)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # headers incomplete
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)
            else:
                self._cancel_header_timer()

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                prefix = "%s:%d - " % self.client if self.client else ""
                self.logger.info("%sclosed: request headers incomplete after %g s", prefix, header_timeout_s)
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

    return TimedH11Protocol


def make_server(model: CloudModel, settings: ServerSettings, sock: socket.socket, on_ready=None, log_level="warning",
                tls_cert=None, tls_key=None):
    """A ``uvicorn.Server`` for ``model`` on an already bound socket (run it with ``server.run(sockets=[sock])``);
    HTTPS with ``tls_cert`` (PEM chain) and ``tls_key`` (PEM key, unless inside the certificate file)."""
    import uvicorn

    app = create_app(model, settings, on_ready)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, http=_timed_protocol(settings.header_timeout_s),
                            timeout_keep_alive=settings.idle_timeout_s,
                            limit_concurrency=4096, h11_max_incomplete_event_size=64 * 1024,
                            timeout_graceful_shutdown=settings.request_timeout_s + 5,
                            ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    return _uvicorn_server_class()(config)


def serve(checkpoint, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          device=None, threads: int | None = None, log_level: str = "warning", tls_cert=None, tls_key=None) -> None:
    """Load the checkpoint (errors here stop the start-up with the reason), bind, serve until SIGINT or SIGTERM
    (both drain the requests in flight, then print the stopped line)."""
    settings = settings or ServerSettings()
    check_bind(host, settings.token)
    check_tls(tls_cert, tls_key)
    if tls_cert is None and not is_loopback(host):
        print(f"hybridexit serve: warning: listening on {host} without TLS: the token and the features cross the "
              f"network in clear; pass --tls-cert/--tls-key or put a TLS reverse proxy in front", file=sys.stderr,
              flush=True)
    if threads:
        torch.set_num_threads(threads)
    model = CloudModel.from_checkpoint(checkpoint, device)
    sock = bind_socket(host, port)
    url = url_of(sock, tls_cert is not None)

    def ready():
        auth = "bearer token required" if settings.token else "no token (loopback only)"
        print(f"hybridexit serve: ready at {url} (model {model.name}, fingerprint {model.fingerprint}, "
              f"features {'x'.join(map(str, model.feature_shape))}, {model.device}, max batch {settings.max_batch}, "
              f"max wait {settings.max_wait_ms:g} ms, {auth})", flush=True)

    server = make_server(model, settings, sock, ready, log_level, tls_cert, tls_key)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ServerConfigError("the server did not start (see the messages above)")
    why = f" on {signal.Signals(server.stop_signal).name}" if server.stop_signal else ""
    print(f"hybridexit serve: stopped{why}", file=sys.stderr, flush=True)
