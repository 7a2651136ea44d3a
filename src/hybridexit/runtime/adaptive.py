"""The adaptive edge's policy: per input, which hand-off block, codec and exit policy to use under a latency target.

A ``Plan`` is one way to answer an input: the edge runs the blocks before ``handoff`` and the exits among them
with the thresholds of one exit policy (``level``, each carrying its Learn-then-Test guarantee); an input no exit
answers is sent with ``codec`` to the cloud, which runs the blocks from ``handoff`` on, or, for a local plan
(``handoff`` = the number of blocks), the edge runs the rest of the network itself. What a plan costs comes from
measurements, not names: the edge's own time per block (measured at start), the cloud's reported service time, the
frame's bytes, the energy model's computation per block and the radio's energy per bit (``links.py``).

``choose`` takes the plans, the live link estimate (``linkest.LinkEstimate``) and the target ``slo_ms`` at
``quantile`` (``--slo-ms 150`` at 0.95: the p95 target), and returns the plan of least expected edge energy per
input (computation + radio) among those whose path for an input that goes on is predicted within the target at
that quantile (the check is per input, so it holds whatever share of inputs exit). When none is, the plan of least
predicted latency. ``degraded`` is set when the cloud is unreachable and the plan chosen on energy alone (with the
link at its last known state) would have sent the input: the answer is local because the cloud could not be used,
not because local was best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(frozen=True)
class Plan:
    """One way to answer an input, with what it costs per input on the edge (measured or modelled)."""

    handoff: int  # first block the cloud runs; == n_blocks: local, the edge runs the whole network
    n_blocks: int
    codec: str | None  # None for a local plan
    level: int  # the exit policy (index into the policy set)
    exit_rate: float  # share of inputs an exit before ``handoff`` answers at this policy (validation split)
    edge_ms_exit: float  # edge time of an input an exit answers
    edge_ms_on: float  # edge time of an input that goes on: its blocks, exits and encoding (local: to the answer)
    uj_exit: float  # edge computation energy of an input an exit answers
    uj_on: float  # edge computation energy of an input that goes on (encoding included; local: to the answer)
    request_bytes: float = 0.0  # HTTP request (headers + frame) per offloaded input
    server_ms: float = 0.0  # the cloud's service time (queue + compute + decode) for this boundary
    decode_ms: float = 0.0  # the edge's reading of the answer
    eps: float | None = None  # the guarantee of the exit policy (disagreement with the full network among exits)
    name: str = ""

    def __post_init__(self):
        if not 0 <= self.handoff <= self.n_blocks:
            raise ConfigError(f"hand-off block {self.handoff} outside 0..{self.n_blocks}")
        if self.local != (self.codec is None):
            raise ConfigError("a local plan has no codec, an offloading plan needs one")
        if not 0 <= self.exit_rate <= 1:
            raise ConfigError(f"exit rate {self.exit_rate} outside [0, 1]")

    @property
    def local(self) -> bool:
        return self.handoff == self.n_blocks

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        where = "local" if self.local else f"b{self.handoff}/{self.codec}"
        return f"{where}/p{self.level}"

    def radio_uj(self, link) -> float:
        """Radio energy of one offloaded input (``links.Link``)."""
        return 0.0 if self.local else link.transmit_uj(self.request_bytes)

    def energy_uj(self, link) -> dict:
        """Expected edge energy per input, split into computation and radio."""
        go_on = 1.0 - self.exit_rate
        compute = self.exit_rate * self.uj_exit + go_on * self.uj_on
        radio = go_on * self.radio_uj(link)
        return {"compute_uj": compute, "radio_uj": radio, "total_uj": compute + radio}

    def predict_ms(self, estimate, quantile: float) -> float:
        """Predicted latency of an input that goes on (the slower path), pessimistic at ``quantile``."""
        if self.local:
            return self.edge_ms_on
        return self.edge_ms_on + estimate.predict_ms(self.request_bytes, quantile) + self.server_ms + self.decode_ms


@dataclass(frozen=True)
class Choice:
    plan: Plan
    predicted_ms: float
    within: bool  # predicted within the target
    degraded: bool  # local only because the cloud is unreachable
    considered: int = 0
    reasons: dict = field(default_factory=dict, compare=False)


@dataclass
class AdaptivePolicy:
    """Chooses a plan per input: least edge energy within ``slo_ms`` at ``quantile`` (see the module)."""

    plans: list[Plan]
    link: object  # links.Link: the radio's energy per bit
    slo_ms: float
    quantile: float = 0.95
    margin: float = 0.9  # plan against ``margin`` x the target: the estimate lags a changing link

    def __post_init__(self):
        if not self.plans:
            raise ConfigError("the adaptive edge needs at least one plan")
        if not any(p.local for p in self.plans):
            raise ConfigError("the adaptive edge needs a local plan (its answer when the cloud is unreachable)")
        if not (self.slo_ms > 0 and 0.5 <= self.quantile < 1 and 0 < self.margin <= 1):
            raise ConfigError("slo_ms must be > 0, quantile in [0.5, 1), margin in (0, 1]")
        self._energy = {p: p.energy_uj(self.link)["total_uj"] for p in self.plans}

    def energy(self, plan: Plan) -> float:
        return self._energy[plan]

    def choose(self, estimate, waited_ms: float = 0.0) -> Choice:
        """The plan for an input that has already waited ``waited_ms`` (behind earlier inputs) since it arrived."""
        budget = self.slo_ms * self.margin - waited_ms
        pred = {p: p.predict_ms(estimate, self.quantile) for p in self.plans}
        ok = [p for p in self.plans if pred[p] <= budget]
        if ok:
            best = min(ok, key=lambda p: (self._energy[p], pred[p]))
        else:
            best = min(self.plans, key=lambda p: (pred[p], self._energy[p]))
        degraded = False
        if best.local and estimate.down:
            cheapest = min(self.plans, key=lambda p: self._energy[p])
            degraded = not cheapest.local
        return Choice(best, pred[best], waited_ms + pred[best] <= self.slo_ms, degraded, len(self.plans))

    def fallback(self, elapsed_ms: float) -> Plan:
        """The local plan for an input whose request failed after ``elapsed_ms``: the cheapest local plan that
        still fits the target, else the fastest."""
        local = [p for p in self.plans if p.local]
        fits = [p for p in local if elapsed_ms + p.edge_ms_on <= self.slo_ms]
        return min(fits, key=self.energy) if fits else min(local, key=lambda p: p.edge_ms_on)

    def request_timeout_ms(self, plan: Plan, elapsed_ms: float) -> float:
        """How long a request may take so that a local answer after it fails still fits the target (at least
        the predicted time of the cheapest local finish, never below 1 ms)."""
        rest = min(p.edge_ms_on for p in self.plans if p.local) - plan.edge_ms_on
        return max(self.slo_ms - elapsed_ms - max(rest, 0.0), 1.0)


def plan_summary(plans: list[Plan], link, estimate=None, quantile: float = 0.95) -> list[dict]:
    """The plans as rows (energy split, predicted latency now when an estimate is given)."""
    rows = []
    for p in plans:
        e = p.energy_uj(link)
        row = {"plan": p.label, "handoff": p.handoff, "codec": p.codec, "level": p.level, "exit_rate": p.exit_rate,
               "request_bytes": p.request_bytes, "edge_ms_on": p.edge_ms_on, "eps": p.eps, **e}
        if estimate is not None:
            ms = p.predict_ms(estimate, quantile)
            row["predicted_ms"] = ms if math.isfinite(ms) else None
        rows.append(row)
    return rows
