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

Test. The audits taken at the current level (at most the last ``window``) are tested every ``check_every`` audits
with exact binomial tests against ``eps`` (the policy's EPS; the conditional disagreement share: audits are a
uniform sample of the exited inputs, so their disagreement share estimates it without bias):
- tighten (one level down) when, for one of the window's suffixes (the last 2, 4, 8, ... x ``check_every`` audits
  and the whole window), P(Binomial(m, eps) >= k) <= alpha / (number of suffixes): disagreement above eps;
- relax (one level up, towards the calibrated level) when P(Binomial(n, eps) <= k) <= alpha over the whole
  window, n >= the level's ``relax_after`` audits: the current level is under eps. A relax that ends in a
  tighten back to the same level doubles that level's ``relax_after`` (fewer useless probes).
alpha = delta / (window / check_every): a block of ``window`` audits at a level holds that many checks. So, per
``window`` audits at a level, the chance of a false tighten while its disagreement stays <= eps is at most delta,
and the same for a false relax while it stays >= eps (a union bound over the checks and suffixes of a block; the
audit outcomes are assumed independent). Over a long clean run of A audits at most delta * A / window false
tightens are expected; each costs exits (never accuracy) until the relax test brings the level back.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..risk import binom_cdf
from . import wire

SCALED_LADDER = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class AuditSettings:
    rate: float  # probability that an exited input is audited
    eps: float  # the disagreement share the exits may have
    delta: float = 0.05  # error budget of each of the two tests, over a whole run at one level
    window: int = 500  # audits kept per level (the most recent)
    check_every: int = 10  # audits between tests
    relax_after: int = 50  # audits at a level before relaxing from it is considered (doubles after a bad probe)
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.rate <= 1:
            raise ConfigError(f"--audit-rate {self.rate}: must be in (0, 1] (a fraction of the exited inputs)")
        if not 0 < self.eps < 1 or not 0 < self.delta < 1:
            raise ConfigError(f"audit eps {self.eps} and delta {self.delta} must be in (0, 1)")
        if self.window < self.check_every or self.check_every < 1 or self.relax_after < 1:
            raise ConfigError("audit window >= check_every >= 1 and relax_after >= 1 are required")


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
    level: int = field(init=False)
    audits: int = 0  # audits answered: exited inputs (level >= 1) also answered by the cloud
    disagreements: int = 0  # among them, the exit's answer differed from the cloud's
    free_audits: int = 0  # level 0: inputs that would have exited at level 1 (the cloud answers them anyway)
    free_disagreements: int = 0
    failed_audits: int = 0  # audit requests the cloud did not answer (no outcome; the edge's answer stands)
    request_bytes: int = 0  # audit request bodies sent (runtime only)
    response_bytes: int = 0
    adaptations: list[Adaptation] = field(default_factory=list)

    def __post_init__(self):
        if not self.levels:
            raise ConfigError("the audit needs at least one threshold level")
        k = len(self.levels[0])
        self.levels = [(0.0,) * k, *[tuple(lv) for lv in self.levels]]
        self.level = self.top
        self._rng = random.Random(self.settings.seed)
        self._relax_after = [self.settings.relax_after] * len(self.levels)
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

    def draw(self) -> bool:
        """Audit this exited input? (rate ``rate``; always at level 0)."""
        return self.shadow or self._rng.random() < self.settings.rate

    def _enter(self, level: int) -> None:
        self.level = level
        self._window: deque[bool] = deque(maxlen=self.settings.window)
        self._seen = 0  # audits at this level since it was entered
        self._checks = 0

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
        return None if self._seen % self.settings.check_every else self._check(index)

    def _scales(self) -> list[int]:
        """Suffix lengths of the window the tighten test looks at: a shift shows first in the latest audits."""
        s = self.settings
        out, m = [], s.check_every * 2
        while m < s.window:
            out.append(m)
            m *= 2
        return [*out, s.window]

    def _check(self, index: int) -> Adaptation | None:
        s = self.settings
        alpha = s.delta / max(s.window // s.check_every, 1)  # a block of `window` audits holds that many checks
        w = list(self._window)
        if self.level >= 1:
            scales = [m for m in self._scales() if m <= len(w)] or [len(w)]
            for m in scales:  # P(Bin(m, eps) >= k): small when the disagreement is above eps
                k = sum(w[-m:])
                p_high = 1.0 - binom_cdf(k - 1, m, s.eps)
                if p_high <= alpha / len(scales):
                    to = self.level - 1
                    last = self.adaptations[-1] if self.adaptations else None
                    if last is not None and last.kind == "relax" and last.from_level == to:  # a probe that failed
                        self._relax_after[to] *= 2
                    return self._move(index, "tighten", to, m, k, p_high)
        n, k = len(w), sum(w)
        p_low = binom_cdf(k, n, s.eps)  # P(Bin(n, eps) <= k): small when the disagreement is below eps
        if self.level < self.top and n >= self._relax_after[self.level] and p_low <= alpha:
            return self._move(index, "relax", self.level + 1, n, k, p_low)
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
        return {"audit_rate": self.settings.rate, "audit_eps": self.settings.eps, "audit_delta": self.settings.delta,
                "audits": self.audits, "audit_disagreements": self.disagreements, "free_audits": self.free_audits,
                "free_audit_disagreements": self.free_disagreements, "failed_audits": self.failed_audits,
                "audit_request_bytes": self.request_bytes, "audit_response_bytes": self.response_bytes,
                "adaptations": len(self.adaptations), "audit_level": self.level, "audit_top_level": self.top,
                "audit_events": [a.to_dict() for a in self.adaptations], "audit_estimate": self.estimate()}


def controller_for(policy, thresholds, options) -> AuditController:
    """The edge runtime's controller: the policy's ladder (or, when ``thresholds`` override the policy, those
    scaled), EPS from ``options.audit_eps`` or the policy's guarantee."""
    from ..policy import ExitPolicy

    if policy is None or tuple(policy.thresholds) != tuple(thresholds):
        policy = ExitPolicy(tuple(thresholds), (), {}, policy.guarantee if policy is not None else None)
    eps = policy_eps(policy, options.audit_eps)
    return AuditController(ladder(policy), AuditSettings(rate=options.audit_rate, eps=eps, seed=options.audit_seed))


def audit_batch(runner, images, preds, decided, start: int, level: int) -> dict[int, dict]:
    """The audits of one batch that the edge decided at ``level`` (``EdgeRunner.run_batch``): the chosen exited
    inputs' edge features go to the cloud in one request (headers ``X-Hybridexit-Audit``: the edge's answers,
    ``X-Hybridexit-Audit-Level``), each outcome goes to the controller. At level 0 the cloud's answer replaces the
    edge's (``preds`` / ``decided`` are changed in place). Returns per batch index the record fields."""
    from ..hybrid import CLOUD, FALLBACK
    from .client import CloudError, _split_bytes

    ctl: AuditController = runner.audit
    shadow = level == 0
    out = {i: {"thresholds": list(ctl.levels[level]), "audit_level": level, "audited": False}
           for i in range(len(preds))}
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
    for i, (e, p, f) in enumerate(zip(entropies.tolist(), exit_preds.tolist(), final_preds.tolist())):
        level, shadow, thr = controller.level, controller.shadow, controller.probe_thresholds
        j = next((j for j in range(len(e)) if e[j] < thr[j]), -1)  # Algorithm 1: the first exit below threshold
        rec = {"index": i, "level": level, "thresholds": list(controller.thresholds), "audited": False}
        if j >= 0 and controller.draw():
            rec.update(audited=True, disagrees=p[j] != f)
            controller.observe(level, p[j] != f, i)
        exited = j >= 0 and not shadow  # at level 0 the cloud answers the would-be exits too
        rec.update(prediction=p[j] if exited else f, decided_at=j if exited else -1)
        out.append(rec)
    return out
