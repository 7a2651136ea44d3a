"""Online audit at the edge: a random share of the exited inputs is also answered by the cloud, and the edge
tightens its exits when the audits show the exits disagreeing with the full network more than the policy allows.

Levels. The controller holds a ladder of threshold settings ordered from strict to lenient: level 0 = no exits
at all, levels 1..L = the ladder stored with a Learn-then-Test policy (``guarantee["levels"]``, each certified on
validation) or, for a policy without one, the calibrated thresholds scaled by 1/4, 1/2, 3/4, 1. Level L is the
calibrated policy; the edge starts there.

Audits. Each input that exits at level l >= 1 is audited with probability ``rate`` (independently, seeded): its
edge features also go to the cloud; the answer given stays the edge's; the cloud's answer says whether the exit
disagreed with the full network. At level 0 nothing exits; the edge still computes where each input *would* have
exited under level 1 and, since every input goes to the cloud anyway, every such input is a free audit of level 1.

Tests. Two anytime-valid sequential tests run on the audits taken at the current level, each restarted when the
level changes (and the tighten test also when a drift alarm starts a burst, below):
- tighten (one level down) when the mixture likelihood ratio of "disagreement p1 = r x eps" against "p = eps",
  averaged over r in ``HIGH_RATIOS``, reaches 1/delta. Under any audit stream whose disagreement probability stays
  <= eps (each audit given the past) every component, hence their average, is a nonnegative supermartingale with
  mean 1, so by Ville's inequality the test ever fires with probability at most delta: per test run, not per window
  or per check, with no union bound over checks;
- relax (one level up, towards the calibrated level) when the same mixture with r in ``LOW_RATIOS`` (p1 < eps)
  reaches 1/delta and the level has seen at least its ``relax_after`` audits: the level is under eps, with the
  same guarantee against a false relax while the disagreement stays >= eps. A relax that ends in a tighten back to
  the same level doubles that level's ``relax_after`` (fewer useless probes).

Drift bursts (optional, ``burst_rate``). Audits are few at a few percent, and a disagreement a few points above eps
needs hundreds of them. But every input says, for free, whether it *would* exit under the calibrated thresholds,
and the policy records how often that happened on validation (its exit share). A two-sided CUSUM on that
indicator (alternatives reference +- ``drift_step``; threshold log(2 ``drift_arl``): on data like the validation
split, a false alarm on average at most once per ``drift_arl`` inputs) raises an alarm when the inputs stop
looking like the validation split. An alarm starts a burst: the audit rate becomes ``burst_rate`` for the next
``burst_audits`` audits and the tighten test restarts (fresh evidence; its delta holds per run). When the burst
ends, the monitor takes the exit share seen since the alarm as its new reference, so a shift that the audits found
harmless costs one burst, not a permanent higher rate.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from ..calibration.risk import binom_cdf
from ..errors import ConfigError
from ..model.exits import exit_rule

SCALED_LADDER = (0.25, 0.5, 0.75, 1.0)


HIGH_RATIOS = (1.25, 1.5, 2.0, 3.0, 5.0)  # tighten test: alternatives p1 = r x eps above eps
LOW_RATIOS = (0.8, 0.6, 0.4, 0.2)  # relax test: alternatives below eps


@dataclass(frozen=True)
class AuditSettings:
    rate: float  # probability that an exited input is audited
    eps: float  # the disagreement share the exits may have
    delta: float = 0.05  # error budget of each test run (false tighten; false relax)
    window: int = 500  # audits kept per level: the window test's span, and the running estimate's
    check_every: int = 10  # audits between window tests
    relax_after: int = 50  # audits at a level before relaxing from it is considered (doubles after a bad probe)
    seed: int = 0
    burst_rate: float | None = None  # audit rate during a drift burst (None: no drift monitor)
    burst_audits: int = 600  # audits per burst
    drift_step: float = 0.15  # the exit-share change the drift CUSUM is tuned to
    drift_arl: float = 100_000.0  # inputs between false drift alarms on validation-like data (on average, at least)

    def __post_init__(self):
        if not 0 < self.rate <= 1:
            raise ConfigError(f"--audit-rate {self.rate}: must be in (0, 1] (a fraction of the exited inputs)")
        if not 0 < self.eps < 1 or not 0 < self.delta < 1:
            raise ConfigError(f"audit eps {self.eps} and delta {self.delta} must be in (0, 1)")
        if self.window < self.check_every or self.check_every < 1 or self.relax_after < 1:
            raise ConfigError("audit window >= check_every >= 1 and relax_after >= 1 are required")
        if self.burst_rate is not None and not self.rate <= self.burst_rate <= 1:
            raise ConfigError(f"--audit-burst-rate {self.burst_rate}: must be in [--audit-rate, 1]")
        if self.burst_audits < 1 or not 0 < self.drift_step < 0.5 or self.drift_arl <= 1:
            raise ConfigError("burst_audits >= 1, 0 < drift_step < 0.5 and drift_arl > 1 are required")


class MixtureTest:
    """Anytime-valid sequential test on Bernoulli outcomes (1 = the exit disagreed): the average over simple
    alternatives p1 = r x eps of the likelihood ratio against p = eps. With all r > 1 it tests H0: p <= eps; with
    all r < 1, H0: p >= eps. Under H0 (each outcome's probability given the past on H0's side) the average is a
    nonnegative supermartingale with mean 1: P(it ever reaches 1/delta) <= delta (Ville's inequality)."""

    def __init__(self, eps: float, ratios: tuple[float, ...]):
        self.p1 = [r * eps for r in ratios if 0 < r * eps < 1 and r != 1]
        if not self.p1:  # eps near 1: halfway between eps and 1 (or 0) instead
            self.p1 = [(eps + (1.0 if ratios[0] > 1 else 0.0)) / 2]
        self._up = [math.log(p / eps) for p in self.p1]
        self._down = [math.log((1 - p) / (1 - eps)) for p in self.p1]
        self.reset()

    def reset(self) -> None:
        self.llr = [0.0] * len(self.p1)
        self.n = self.k = 0

    def update(self, x: bool) -> None:
        self.n += 1
        self.k += bool(x)
        step = self._up if x else self._down
        self.llr = [v + d for v, d in zip(self.llr, step)]

    def log_evidence(self) -> float:
        """log of the mixture likelihood ratio (0 at the start)."""
        m = max(self.llr)
        return m + math.log(sum(math.exp(v - m) for v in self.llr) / len(self.llr))


class ShareCUSUM:
    """Two-sided CUSUM on a stream of Bernoulli indicators against a reference share q0, tuned to a change of
    +- ``step``: alarms when either side's accumulated log likelihood ratio (reset at 0) reaches log(2 arl), so on
    a stream with share q0 a false alarm comes on average at most once per ``arl`` indicators (Lorden's bound)."""

    def __init__(self, q0: float, step: float, arl: float):
        self.h = math.log(2 * arl)
        self.step = step
        self.rebase(q0)

    def rebase(self, q0: float) -> None:
        q0 = min(max(q0, 0.01), 0.99)
        self.q0 = q0
        alts = [min(max(q0 + d, 0.005), 0.995) for d in (self.step, -self.step)]
        self._llr = [(math.log(q1 / q0), math.log((1 - q1) / (1 - q0))) for q1 in alts]
        self.s = [0.0, 0.0]
        self.seen = self.hits = 0  # since the last rebase / alarm: the share the next rebase takes

    def update(self, x: bool, test: bool = True) -> bool:
        """One indicator, counted; with ``test``, True when it raises an alarm (the statistics and the counts
        then restart, so the next rebase takes the share seen since the alarm)."""
        self.seen += 1
        self.hits += bool(x)
        if not test:
            return False
        self.s = [max(0.0, v + (up if x else down)) for v, (up, down) in zip(self.s, self._llr)]
        if max(self.s) >= self.h:
            self.s = [0.0, 0.0]
            self.seen = self.hits = 0
            return True
        return False


@dataclass(frozen=True)
class Adaptation:
    index: int  # the input whose audit triggered it
    kind: str  # "tighten" or "relax"
    from_level: int
    to_level: int
    audits: int  # audits in the window tested
    disagreements: int
    p_value: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def upper_bound(k: int, n: int, delta: float) -> float:
    """The largest p with P(Binomial(n, p) <= k) >= delta (one-sided Clopper-Pearson), by bisection."""
    lo, hi = k / n, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binom_cdf(k, n, mid) > delta else (lo, mid)
    return hi


def ladder(policy) -> list[tuple[float, ...]]:
    """Levels 1..L of a policy (strict -> lenient, last = the policy's thresholds)."""
    g = policy.guarantee or {}
    levels = [tuple(float(t) for t in lv) for lv in g.get("levels", [])]
    if not levels or levels[-1] != tuple(policy.thresholds):
        levels = [tuple(f * t for t in policy.thresholds) for f in SCALED_LADDER]
    return levels


def policy_eps(policy, eps: float | None = None) -> float:
    """The EPS the audit holds the exits to: given, or the policy's Learn-then-Test guarantee's."""
    if eps is not None:
        return eps
    g = policy.guarantee or {}
    if "eps" not in g:
        raise ConfigError("this exit policy carries no risk guarantee (no EPS): calibrate it with "
                          "`hybridexit calibrate CKPT --risk EPS --delta DELTA --write` or pass --audit-eps")
    return float(g["eps"])


@dataclass
class AuditController:
    levels: list[tuple[float, ...]]  # 1..L, strict -> lenient; level 0 (no exits) is added in front
    settings: AuditSettings
    reference_share: float | None = None  # the calibrated level's exit share on validation (drift monitor)
    level: int = field(init=False)
    audits: int = 0  # audits answered: exited inputs (level >= 1) also answered by the cloud
    disagreements: int = 0  # among them, the exit's answer differed from the cloud's
    free_audits: int = 0  # level 0: inputs that would have exited at level 1 (the cloud answers them anyway)
    free_disagreements: int = 0
    failed_audits: int = 0  # audit requests the cloud did not answer (no outcome; the edge's answer stands)
    request_bytes: int = 0  # audit request bodies sent (runtime only)
    response_bytes: int = 0
    burst_audits_taken: int = 0  # audits drawn at the burst rate
    adaptations: list[Adaptation] = field(default_factory=list)
    drift_alarms: list[int] = field(default_factory=list)  # inputs whose indicator raised a drift alarm

    def __post_init__(self):
        if not self.levels:
            raise ConfigError("the audit needs at least one threshold level")
        k = len(self.levels[0])
        self.levels = [(0.0,) * k, *[tuple(lv) for lv in self.levels]]
        s = self.settings
        self._rng = random.Random(s.seed)
        self._relax_after = [s.relax_after] * len(self.levels)
        self._high, self._low = MixtureTest(s.eps, HIGH_RATIOS), MixtureTest(s.eps, LOW_RATIOS)
        self._monitor = None
        if s.burst_rate is not None:
            if self.reference_share is None:
                raise ConfigError("the drift monitor needs the policy's exit share on validation (chosen_by."
                                  "exit_fraction): recalibrate, or run without --audit-burst-rate")
            self._monitor = ShareCUSUM(self.reference_share, s.drift_step, s.drift_arl)
        self._burst_left = 0
        self._enter(self.top)

    @property
    def top(self) -> int:
        return len(self.levels) - 1

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The thresholds that decide inputs now (all 0 at level 0: nothing exits)."""
        return self.levels[self.level]

    @property
    def probe_thresholds(self) -> tuple[float, ...]:
        """The thresholds the edge runs its exits with: the current ones, or level 1's at level 0 (inputs that
        would exit there are all audited, and answered by the cloud)."""
        return self.levels[max(self.level, 1)]

    @property
    def shadow(self) -> bool:
        """At level 0, every would-be exit is audited for free and answered by the cloud."""
        return self.level == 0

    @property
    def bursting(self) -> bool:
        return self._burst_left > 0

    @property
    def rate(self) -> float:
        """The audit rate now: the burst rate during a drift burst, else the base rate."""
        return self.settings.burst_rate if self.bursting else self.settings.rate

    def draw(self) -> bool:
        """Audit this exited input? (the current rate; always at level 0)."""
        if self.shadow:
            return True
        hit = self._rng.random() < self.rate
        if hit and self.bursting:
            self.burst_audits_taken += 1
            self._burst_left -= 1
            if not self._burst_left:
                self._monitor.rebase(self._monitor.hits / max(self._monitor.seen, 1))
        return hit

    def see(self, would_exit_calibrated: bool, index: int) -> bool:
        """Every input, audited or not: would it exit under the calibrated thresholds? Feeds the drift monitor;
        True when this input raised an alarm (a burst starts; the tighten test restarts)."""
        # no test during a burst: it only counts, and its share becomes the next reference
        if self._monitor is None or not self._monitor.update(would_exit_calibrated, test=not self.bursting):
            return False
        self.drift_alarms.append(index)
        self._burst_left = self.settings.burst_audits
        self._high.reset()
        return True

    def _enter(self, level: int) -> None:
        self.level = level
        self._window: deque[bool] = deque(maxlen=self.settings.window)
        self._seen = 0  # audits at this level since it was entered
        self._high.reset()
        self._low.reset()

    def observe(self, level: int, disagrees: bool, index: int) -> Adaptation | None:
        """An audit's outcome for an input decided at ``level``; ignored (but counted) when the level has changed
        since. Returns the adaptation it triggered, if any."""
        if level == 0:
            self.free_audits += 1
            self.free_disagreements += bool(disagrees)
        else:
            self.audits += 1
            self.disagreements += bool(disagrees)
        if level != self.level:
            return None
        self._window.append(bool(disagrees))
        self._seen += 1
        self._high.update(disagrees)
        self._low.update(disagrees)
        return self._check(index)

    def _scales(self) -> list[int]:
        """Suffix lengths the window test looks at: an abrupt jump shows first in the latest audits."""
        s = self.settings
        out, m = [], s.check_every * 2
        while m < s.window:
            out.append(m)
            m *= 2
        return [*out, s.window]

    def _window_test(self) -> tuple[int, int, float] | None:
        """Every ``check_every`` audits: exact binomial tests of the window's suffixes against eps, at
        alpha = (delta / 2) / (window / check_every) / (number of suffixes). Returns (m, k, p) of a suffix that
        rejects p <= eps, or None."""
        s = self.settings
        w = list(self._window)
        if self._seen % s.check_every:
            return None
        scales = [m for m in self._scales() if m <= len(w)] or [len(w)]
        alpha = s.delta / 2 / max(s.window // s.check_every, 1) / len(scales)
        for m in scales:
            k = sum(w[-m:])
            p_high = 1.0 - binom_cdf(k - 1, m, s.eps)
            if p_high <= alpha:
                return m, k, p_high
        return None

    def _check(self, index: int) -> Adaptation | None:
        bar = math.log(2 / self.settings.delta)  # delta / 2: the other half is the window test's
        hit = None
        if self.level >= 1:
            if self._high.log_evidence() >= bar:  # sustained disagreement above eps
                hit = self._high.n, self._high.k, math.exp(-self._high.log_evidence())
            else:
                hit = self._window_test()  # an abrupt jump
        if hit is not None:
            to = self.level - 1
            last = self.adaptations[-1] if self.adaptations else None
            if last is not None and last.kind == "relax" and last.from_level == to:  # a probe that failed
                self._relax_after[to] *= 2
            return self._move(index, "tighten", to, *hit)
        if (self.level < self.top and self._low.n >= self._relax_after[self.level]
                and self._low.log_evidence() >= math.log(1 / self.settings.delta)):  # disagreement below eps
            return self._move(index, "relax", self.level + 1, self._low.n, self._low.k,
                              math.exp(-self._low.log_evidence()))
        return None

    def _move(self, index, kind, to, n, k, p) -> Adaptation:
        a = Adaptation(index, kind, self.level, to, n, k, p)
        self.adaptations.append(a)
        self._enter(to)
        return a

    def estimate(self) -> dict:
        """The running estimate at the current level: audits in the window, disagreements, their share, and the
        one-sided exact binomial (Clopper-Pearson) upper bound at confidence 1 - delta (None without audits)."""
        n, k = len(self._window), sum(self._window)
        return {"level": self.level, "audits": n, "disagreements": k, "share": k / n if n else None,
                "upper_bound": upper_bound(k, n, self.settings.delta) if n else None}

    def summary(self) -> dict:
        s = self.settings
        return {"audit_rate": s.rate, "audit_eps": s.eps, "audit_delta": s.delta, "audit_burst_rate": s.burst_rate,
                "audits": self.audits, "audit_disagreements": self.disagreements, "free_audits": self.free_audits,
                "free_audit_disagreements": self.free_disagreements, "failed_audits": self.failed_audits,
                "audit_request_bytes": self.request_bytes, "audit_response_bytes": self.response_bytes,
                "adaptations": len(self.adaptations), "audit_level": self.level, "audit_top_level": self.top,
                "drift_alarms": len(self.drift_alarms), "burst_audits": self.burst_audits_taken,
                "audit_events": [a.to_dict() for a in self.adaptations], "audit_estimate": self.estimate()}


def reference_share(policy) -> float | None:
    """The calibrated thresholds' exit share on validation, as the policy recorded it (None when it did not)."""
    v = (policy.chosen_by or {}).get("exit_fraction") if policy is not None else None
    if v is None:
        return None
    return float(sum(v)) if isinstance(v, (list, tuple)) else float(v)


def controller_for(policy, thresholds, options) -> AuditController:
    """The edge runtime's controller: the policy's ladder (or, when ``thresholds`` override the policy, those
    scaled), EPS from ``options.audit_eps`` or the policy's guarantee."""
    from ..model.policy import ExitPolicy

    if policy is None or tuple(policy.thresholds) != tuple(thresholds):
        policy = ExitPolicy(tuple(thresholds), (), {}, policy.guarantee if policy is not None else None)
    eps = policy_eps(policy, options.audit_eps)
    burst = options.audit_burst_rate
    settings = AuditSettings(rate=options.audit_rate, eps=eps, seed=options.audit_seed, burst_rate=burst)
    return AuditController(ladder(policy), settings, reference_share(policy) if burst is not None else None)


def would_exit(entropies, thresholds) -> list[bool]:
    """Per input: would it exit under ``thresholds``? (Some exit's entropy below its threshold; NaN: not reached,
    which happens only after an earlier exit fired at thresholds at least as strict.)"""
    import torch

    return exit_rule(entropies, torch.as_tensor(thresholds, dtype=entropies.dtype)).any(1).tolist()


def count_audit(stats, headers, logits, body_bytes: int, cloud_uj: float) -> None:
    """The server's side: count an audit request (``server.Stats``' audit fields) from its headers and answer."""
    n = len(logits)
    stats.audit_requests += 1
    stats.audit_samples += n
    stats.audit_request_bytes += body_bytes
    stats.audit_cloud_uj += n * cloud_uj
    stats.audit_levels[headers.get("x-hybridexit-audit-level", "?")] += 1
    try:
        edge = [int(v) for v in headers.get("x-hybridexit-audit", "").split(",")]
    except ValueError:  # not the edge's answers: counted as an audit, no disagreement known
        return
    if len(edge) == n:
        stats.audit_disagreements += sum(e != c for e, c in zip(edge, logits.argmax(1).tolist()))


def simulate_audited(exit_preds, final_preds, entropies, controller: AuditController) -> list[dict]:
    """The audited edge on a stream whose every exit's prediction and (exit-rule) entropy and the full network's
    prediction are known (``ExitStats``-like tensors, in stream order), with the runtime's controller: one record
    per input. Record keys: index, level, thresholds (those that decided it), audited, disagrees (audited only),
    prediction, decided_at (exit index, or -1 for the cloud)."""
    out = []
    would = would_exit(entropies, controller.levels[controller.top])  # the drift monitor's indicator per input
    for i, (e, p, f) in enumerate(zip(entropies.tolist(), exit_preds.tolist(), final_preds.tolist())):
        level, shadow, thr = controller.level, controller.shadow, controller.probe_thresholds
        j = next((j for j in range(len(e)) if exit_rule(e[j], thr[j])), -1)  # Algorithm 1: the first exit that stops
        rec = {"index": i, "level": level, "thresholds": list(controller.thresholds), "audited": False}
        if controller.see(would[i], i):
            rec["drift_alarm"] = True
        if j >= 0 and controller.draw():
            rec.update(audited=True, disagrees=p[j] != f)
            controller.observe(level, p[j] != f, i)
        exited = j >= 0 and not shadow  # at level 0 the cloud answers the would-be exits too
        rec.update(prediction=p[j] if exited else f, decided_at=j if exited else -1)
        out.append(rec)
    return out
