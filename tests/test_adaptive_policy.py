"""The adaptive edge's policy (runtime/adaptive.py) and link estimate (runtime/linkest.py) on a synthetic link model
where the best plan is known: least edge energy among the plans whose latency fits the target."""

from __future__ import annotations

import math
import random

import pytest

from hybridexit.codecs.links import Link
from hybridexit.errors import ConfigError
from hybridexit.runtime.adaptive import AdaptivePolicy, Plan
from hybridexit.runtime.linkest import LinkEstimate

RADIO = Link("test", 0.01)  # uJ per bit: 1 KB costs 82 uJ, 8 KB 655 uJ
SLO = 150.0


def _plans():
    common = {"n_blocks": 15, "level": 0, "exit_rate": 0.5, "edge_ms_exit": 2.0, "uj_exit": 20.0}
    return [
        Plan(handoff=15, codec=None, edge_ms_on=40.0, uj_on=10_000.0, name="local", **common),
        Plan(handoff=10, codec="bn", edge_ms_on=5.0, uj_on=100.0, request_bytes=1024, server_ms=5.0,
             name="small", **common),
        Plan(handoff=10, codec="int8", edge_ms_on=3.0, uj_on=50.0, request_bytes=8192, server_ms=5.0,
             name="big", **common),
    ]


def _true_ms(plan: Plan, rtt_ms: float, up_mbps: float) -> float:
    """The synthetic link: a request of b bytes takes rtt + 8 b / rate."""
    if plan.local:
        return plan.edge_ms_on
    return plan.edge_ms_on + rtt_ms + 8 * plan.request_bytes / (up_mbps * 1e6) * 1000 + plan.server_ms


def _known_best(plans, rtt_ms, up_mbps):
    ok = [p for p in plans if _true_ms(p, rtt_ms, up_mbps) <= SLO]
    return min(ok, key=lambda p: p.energy_uj(RADIO)["total_uj"])


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _feed(est: LinkEstimate, clock: _Clock, rtt_ms, up_mbps, rng, n=12):
    """Probes and 1 KB / 8 KB requests over the synthetic link, with 5 % jitter."""
    for i in range(n):
        clock.t += 0.05
        jit = 1 + rng.uniform(-0.05, 0.05)
        if i % 3 == 0:
            est.observe(200, rtt_ms * jit)
        else:
            b = 1024 if i % 3 == 1 else 8192
            est.observe(b, (rtt_ms + 8 * b / (up_mbps * 1e6) * 1000) * jit)


@pytest.mark.parametrize("rtt_ms,up_mbps,want", [
    (20, 20.0, "small"),  # good link: the cheapest offload fits
    (60, 0.2, "small"),  # 1 KB fits (41 ms of transfer), 8 KB would not (328 ms)
    (100, 0.1, "local"),  # even 1 KB misses the target: answer locally
    (300, 50.0, "local"),  # a long round trip alone misses it
])
def test_policy_picks_the_known_best_plan(rtt_ms, up_mbps, want):
    plans = _plans()
    assert _known_best(plans, rtt_ms, up_mbps).name == want
    clock, rng = _Clock(), random.Random(0)
    est = LinkEstimate(clock=clock)
    _feed(est, clock, rtt_ms, up_mbps, rng)
    choice = AdaptivePolicy(plans, RADIO, SLO).choose(est)
    assert choice.plan.name == want
    assert choice.within and not choice.degraded


def test_big_frames_win_when_their_radio_is_cheap_and_the_link_fast():
    """With a free radio the 8 KB plan (less computation) is best where it fits, and only there."""
    free = Link("free", 0.0)
    plans = _plans()
    clock, rng = _Clock(), random.Random(1)
    est = LinkEstimate(clock=clock)
    _feed(est, clock, 20, 20.0, rng)
    assert AdaptivePolicy(plans, free, SLO).choose(est).plan.name == "big"
    clock.t += 10  # the old samples leave the window
    _feed(est, clock, 60, 0.2, rng)
    assert AdaptivePolicy(plans, free, SLO).choose(est).plan.name == "small"


def test_policy_meets_the_target_on_a_changing_link_with_the_least_energy():
    """A synthetic link alternating good / slow / dead; per input the edge chooses, sends (or not) and observes
    what its request took. The adaptive edge keeps >= 99 % within the target and spends no more energy than any
    static plan that also keeps the target."""
    plans = _plans()
    rng = random.Random(7)
    states = [(20, 20.0)] * 200 + [(60, 0.2)] * 200 + [(None, None)] * 100 + [(100, 0.1)] * 200 + [(20, 20.0)] * 200
    clock = _Clock()
    est = LinkEstimate(clock=clock, probe_interval_s=0.2)
    policy = AdaptivePolicy(plans, RADIO, SLO)
    lat, energy = [], []
    for rtt, up in states:
        clock.t += 0.05
        if est.needs_probe():
            est.observe(200, rtt) if rtt is not None else est.observe_failure()
        plan = policy.choose(est).plan
        exits = rng.random() < plan.exit_rate
        if exits or plan.local:
            ms = plan.edge_ms_exit if exits else plan.edge_ms_on
            lat.append(ms)
            energy.append(plan.uj_exit if exits else plan.uj_on)
            continue
        if rtt is None:  # the request times out at what the target still allows, then the edge finishes alone
            timeout = policy.request_timeout_ms(plan, plan.edge_ms_on)
            est.observe_failure()
            fb = policy.fallback(plan.edge_ms_on + timeout)
            lat.append(plan.edge_ms_on + timeout + fb.edge_ms_on - plan.edge_ms_on)
            energy.append(plan.uj_on + plan.radio_uj(RADIO) + fb.uj_on)
            continue
        ms = _true_ms(plan, rtt, up) * (1 + rng.uniform(-0.05, 0.05))
        est.observe(plan.request_bytes, ms - plan.edge_ms_on - plan.server_ms)
        lat.append(ms)
        energy.append(plan.uj_on + plan.radio_uj(RADIO))
    within = sum(v <= SLO for v in lat) / len(lat)
    assert within >= 0.99
    ours = sum(energy) / len(energy)
    for p in plans:  # a static plan keeps the target only if it fits in every state (dead link: only local)
        static_ok = all(rtt is not None and _true_ms(p, rtt, up) <= SLO for rtt, up in states) or p.local
        if static_ok:
            assert ours <= p.energy_uj(RADIO)["total_uj"] + 1e-9, p.name


def test_an_unreachable_cloud_gives_degraded_local_answers():
    plans = _plans()
    clock = _Clock()
    est = LinkEstimate(clock=clock)
    _feed(est, clock, 20, 20.0, random.Random(2))
    est.observe_failure()
    assert math.isinf(est.predict_ms(1000))
    c = AdaptivePolicy(plans, RADIO, SLO).choose(est)
    assert c.plan.local and c.degraded
    est.observe(200, 20)  # a probe succeeds: the link is back
    assert not est.down and AdaptivePolicy(plans, RADIO, SLO).choose(est).plan.name == "small"


def test_link_estimate_tracks_rtt_and_bandwidth_within_its_window():
    clock = _Clock()
    est = LinkEstimate(clock=clock, window_s=2.0)
    _feed(est, clock, 50, 4.0, random.Random(3), n=30)
    assert est.rtt_ms() == pytest.approx(50, rel=0.06)
    assert est.up_mbps() == pytest.approx(4.0, rel=0.25)
    true = 50 + 8 * 8192 / 4e3  # 8 KB at 4 Mbit/s after a 50 ms round trip
    assert true <= est.predict_ms(8192, 0.95) <= 1.5 * true  # pessimistic: 1 KB samples carry jitter into 8 KB
    assert est.predict_ms(8192, 0.5) == pytest.approx(true, rel=0.1)
    clock.t += 5
    assert est.snapshot()["rtt_samples"] == 0 and est.needs_probe()
    _feed(est, clock, 200, 0.5, random.Random(4), n=30)
    assert est.rtt_ms() == pytest.approx(200, rel=0.06) and est.up_mbps() == pytest.approx(0.5, rel=0.25)


def test_bad_settings_are_refused():
    plans = _plans()
    with pytest.raises(ConfigError, match="local plan"):
        AdaptivePolicy([p for p in plans if not p.local], RADIO, SLO)
    with pytest.raises(ConfigError, match="slo_ms"):
        AdaptivePolicy(plans, RADIO, 0)
    with pytest.raises(ConfigError, match="codec"):
        Plan(handoff=15, n_blocks=15, codec="bn", level=0, exit_rate=0, edge_ms_exit=0, edge_ms_on=1, uj_exit=0,
             uj_on=1)
    with pytest.raises(ConfigError):
        LinkEstimate(window_s=0)
