"""The edge's live estimate of its link to the cloud: round trip and uplink bandwidth, with their spread.

Fed by the edge's own requests (``observe``: bytes sent and received, and the network time, i.e. the request's
wall time less the service time the cloud reports in its answer) and by cheap probes when it has sent nothing for a
while (``needs_probe``: a ``GET /healthz``, a few hundred bytes, measures the round trip only). A failed request
(timeout, refused connection) marks the link down until a later request or probe succeeds.

Model: sending ``b`` bytes up (and a short answer down) takes ``rtt + b x c``, ``c`` the uplink's time per byte
(8 / bandwidth). The round trip comes from small exchanges (probes and requests of at most ``small_bytes``); each
larger request gives one sample ``c = max(t - rtt, 0) / b`` with ``rtt`` the median round trip of the window. A
sample from a small frame is noisy (its transfer may hide in the round trip's jitter), but it predicts frames of its
own size well, and a larger frame's prediction from it errs on the slow side at a high quantile. Only samples of
the last ``window_s`` seconds count (the link changes); with none, the last known value stands, its age reported.
``predict_ms(b, q)`` is pessimistic: the round trip's ``q`` quantile plus ``b`` times the ``q`` quantile of ``c``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class _Sample:
    at: float
    value: float


def _per_byte_ms(mbps: float) -> float:
    return 0.008 / mbps


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty list."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class LinkEstimate:
    """Round trip (ms) and uplink bandwidth (Mbit/s) from recent exchanges; ``predict_ms`` for a transfer."""

    def __init__(self, window_s: float = 5.0, max_samples: int = 32, small_bytes: int = 600,
                 probe_interval_s: float = 0.5, prior_rtt_ms: float = 100.0, prior_up_mbps: float = 1.0,
                 clock=time.monotonic):
        if not (window_s > 0 and max_samples >= 1 and probe_interval_s > 0 and prior_rtt_ms >= 0
                and prior_up_mbps > 0):
            raise ConfigError("link estimate: window_s, max_samples, probe_interval_s and prior_up_mbps must be > 0, "
                              "prior_rtt_ms >= 0")
        self.window_s, self.small_bytes, self.probe_interval_s = window_s, small_bytes, probe_interval_s
        self.clock = clock
        self._rtt: deque[_Sample] = deque(maxlen=max_samples)
        self._per_byte: deque[_Sample] = deque(maxlen=max_samples)  # ms per byte sent
        self._last_rtt, self._last_per_byte = prior_rtt_ms, _per_byte_ms(prior_up_mbps)
        self.last_exchange = -math.inf
        self.down_since: float | None = None
        self.samples = 0
        self.failures = 0
        self._lock = threading.RLock()  # the edge's requests and its background probe both feed it

    # ------------------------------------------------------------------ feeding
    def observe(self, up_bytes: int, net_ms: float, now: float | None = None) -> None:
        """One exchange that succeeded: ``up_bytes`` sent, ``net_ms`` on the network (wall - the cloud's time)."""
        with self._lock:
            self._observe(up_bytes, net_ms, self.clock() if now is None else now)

    def _observe(self, up_bytes: int, net_ms: float, now: float) -> None:
        net_ms = max(float(net_ms), 0.0)
        self.last_exchange, self.down_since = now, None
        self.samples += 1
        if up_bytes <= self.small_bytes:
            self._rtt.append(_Sample(now, net_ms))
            self._last_rtt = net_ms
            return
        c = max(net_ms - self.rtt_ms(0.5, now), 0.0) / up_bytes
        self._per_byte.append(_Sample(now, c))
        self._last_per_byte = c

    def observe_failure(self, now: float | None = None) -> None:
        """A request or probe that got no answer: the link is down until something succeeds."""
        now = self.clock() if now is None else now
        with self._lock:
            self._fail(now)

    def _fail(self, now: float) -> None:
        self.failures += 1
        self.last_exchange = now
        if self.down_since is None:
            self.down_since = now

    # ------------------------------------------------------------------ reading
    def _recent(self, d: deque, now: float) -> list[float]:
        with self._lock:
            return [s.value for s in d if now - s.at <= self.window_s]

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def rtt_ms(self, q: float = 0.5, now: float | None = None) -> float:
        v = self._recent(self._rtt, self.clock() if now is None else now)
        return _quantile(v, q) if v else self._last_rtt

    def per_byte_ms(self, q: float = 0.5, now: float | None = None) -> float:
        v = self._recent(self._per_byte, self.clock() if now is None else now)
        return _quantile(v, q) if v else self._last_per_byte

    def up_mbps(self, q: float = 0.5, now: float | None = None) -> float:
        """Uplink bandwidth at quantile ``q`` (a low ``q``: a pessimistic rate); inf when no transfer time shows."""
        c = self.per_byte_ms(1.0 - q, now)
        return 0.008 / c if c > 0 else math.inf

    def predict_ms(self, up_bytes: float, q: float = 0.95, now: float | None = None) -> float:
        """Network time of sending ``up_bytes`` (plus a short answer), pessimistic at quantile ``q``; inf when the
        link is down."""
        if self.down:
            return math.inf
        now = self.clock() if now is None else now
        return self.rtt_ms(q, now) + up_bytes * self.per_byte_ms(q, now)

    def needs_probe(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return now - self.last_exchange >= self.probe_interval_s

    def snapshot(self, now: float | None = None) -> dict:
        """What the estimate says now (for records and summaries)."""
        now = self.clock() if now is None else now
        return {"rtt_ms_p50": self.rtt_ms(0.5, now), "rtt_ms_p95": self.rtt_ms(0.95, now),
                "up_mbps_p50": self.up_mbps(0.5, now), "up_mbps_p05": self.up_mbps(0.05, now),
                "rtt_samples": len(self._recent(self._rtt, now)),
                "bw_samples": len(self._recent(self._per_byte, now)),
                "down": self.down, "age_s": now - self.last_exchange if math.isfinite(self.last_exchange) else None}
