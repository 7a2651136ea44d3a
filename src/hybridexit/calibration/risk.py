"""Risk-controlled exit thresholds: Learn then Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021).

The risk of a threshold setting is the expectation of a per-sample loss in [0, 1]. Two risks, two forms:

- ``disagreement``: the edge's answer for an exited sample differs from the full network's final prediction
  (what the cloud half would have said). Needs no labels, so the edge can audit it online (runtime/audit.py).
- ``label``: the edge's answer for an exited sample differs from the label.

- ``conditional`` (default, the issue's "share of exited samples"): R(lam) = P(bad | the sample exits under lam).
  Given the set of calibration samples that exit (m of them), their losses are m independent Bernoulli(R(lam))
  draws (exchangeability), so the p-value is computed on those m samples; m = 0 gives p = 1.
- ``joint``: R(lam) = P(the sample exits under lam and is bad), loss 1[exited and bad] on all n samples.

Procedure (``ltt_policy``): the validation split is cut once, by a fixed seed, into a *fit* part (default 20 %)
and a *test* part. On the fit part only: the exit temperatures (optional) and the threshold sequence, one joint
sequence for all exits: lam in (0, 1] maps to, at every exit, the lam-quantile of that exit's (tempered) entropy
on the fit part; lam runs from strict (small, few exits) to lenient. (Conditional form: the sequence starts at the
first lam whose fit-part exit share promises the test part 5x the fewest exited samples any test can pass with,
``_start``; stricter lam would end the sequence at once for want of samples.) On the test part: for each lam the null
hypothesis H(lam): R(lam) > eps gets the Hoeffding-Bentkus p-value
    p(lam) = min( exp(-n h1(min(Rhat, eps), eps)),  e * P(Binomial(n, eps) <= n Rhat) ),
    h1(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b)),
and fixed-sequence testing rejects H(lam_1), H(lam_2), ... while p <= delta, stopping at the first failure. Every
rejected lam has R(lam) <= eps simultaneously with probability >= 1 - delta over the test part (family-wise error
control of fixed-sequence testing; the sequence was fixed before the test part was looked at). The most lenient
rejected lam is chosen. The guarantee holds for data exchangeable with the validation split, nothing more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, TargetUnreachableError
from ..model.exits import exit_rule
from ..model.policy import ExitPolicy
from .stats import ExitStats
from .temperature import fit_temperatures

RISKS = ("disagreement", "label")
FORMS = ("conditional", "joint")
MAX_LEVELS = 6  # rungs of the audit ladder stored with the policy (each one certified by the same test)


def binom_cdf(k, n, p: float):
    """P(Binomial(n, p) <= k), summed in log space; ``k`` and ``n`` ints or equal-length sequences of ints
    (then a list of floats)."""
    many = not isinstance(k, int)
    ks = torch.as_tensor(k if many else [k], dtype=torch.float64)
    ns = torch.as_tensor(n if many else [n], dtype=torch.float64)
    if p <= 0.0 or p >= 1.0:
        out = torch.where(ks < 0, 0.0, 1.0) if p <= 0.0 else torch.where(ks >= ns, 1.0, 0.0)
    else:
        top = torch.minimum(ks, ns).clamp(min=-1)
        i = torch.arange(0, int(top.max().item()) + 2, dtype=torch.float64)[None]  # (1, kmax + 2)
        keep = i <= top[:, None]
        ii, nn_ = torch.where(keep, i, 0.0), ns[:, None]
        logpmf = (torch.lgamma(nn_ + 1) - torch.lgamma(ii + 1) - torch.lgamma(nn_ - ii + 1)
                  + ii * math.log(p) + (nn_ - ii) * math.log1p(-p))
        out = torch.logsumexp(torch.where(keep, logpmf, -math.inf), 1).exp().clamp(max=1.0)
        out = torch.where(ks >= ns, 1.0, out)
    return out.tolist() if many else float(out[0])


def hb_pvalue(bad, n, eps: float):
    """Hoeffding-Bentkus p-value of H: risk > eps after ``bad`` losses of 1 among ``n`` samples (0/1 losses);
    ints, or equal-length sequences of ints (then a list)."""
    many = not isinstance(bad, int)
    bads, ns = (list(bad), list(n)) if many else ([bad], [n])
    # b >= ceil(m eps): the binomial CDF at b is at least 1/2 (the median is floor or ceil of m eps), so
    # e * CDF > 1 and Hoeffding's term is 1 as well: p = 1 without computing it
    low = [i for i, (b, m) in enumerate(zip(bads, ns)) if 0 < m and b < math.ceil(m * eps)]
    bentkus = dict(zip(low, binom_cdf([bads[i] for i in low], [ns[i] for i in low], eps))) if low else {}
    out = []
    for i, (b, m) in enumerate(zip(bads, ns)):
        if i not in bentkus:
            out.append(1.0)
            continue
        bk = bentkus[i]
        r = min(b / m, eps)
        h1 = (r * math.log(r / eps) if r > 0 else 0.0) + (1 - r) * math.log((1 - r) / (1 - eps))
        out.append(min(math.exp(-m * h1), math.e * bk, 1.0))
    return out if many else out[0]


def fixed_sequence(pvalues: list[float], delta: float) -> int:
    """Fixed-sequence testing: how many leading hypotheses are rejected (p <= delta, stop at the first failure)."""
    for i, p in enumerate(pvalues):
        if p > delta:
            return i
    return len(pvalues)


def min_samples(eps: float, delta: float, limit: int = 10**7) -> int:
    """The fewest samples with which any test can pass: zero losses among them give a p-value <= delta."""
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hb_pvalue(0, mid, eps) <= delta else (mid + 1, hi)
    return lo


def check_risk_args(eps: float, delta: float, kind: str, form: str) -> None:
    if not 0 < eps < 1:
        raise ConfigError(f"--risk {eps}: the risk level must be in (0, 1) (a fraction, e.g. 0.05)")
    if not 0 < delta < 1:
        raise ConfigError(f"--delta {delta}: must be in (0, 1) (e.g. 0.1 for a 90 % guarantee)")
    if kind not in RISKS:
        raise ConfigError(f"risk kind {kind!r}: use one of {', '.join(RISKS)}")
    if form not in FORMS:
        raise ConfigError(f"risk form {form!r}: use one of {', '.join(FORMS)}")


def risk_counts(stats: ExitStats, sequence, kind: str, entropies: torch.Tensor | None = None
                ) -> tuple[list[int], list[int]]:
    """Per threshold setting of ``sequence``: (exited, exited and bad), bad = the edge's answer differs from the
    final prediction (``disagreement``) or from the label (``label``). ``entropies`` (N, K): the exit rule's
    entropies (default: temperature 1). Algorithm 1 for all settings at once: a sample exits at the first exit
    whose entropy is below its threshold (``ExitStats.simulate``'s rule; tests check they agree)."""
    ents = (stats.entropies if entropies is None else entropies).double()
    thr = torch.tensor([list(t) for t in sequence], dtype=torch.float64).T  # (K, L)
    stop = exit_rule(ents[:, :, None], thr[None])  # (N, K, L)
    exited = stop.any(1)  # (N, L)
    first = stop.to(torch.int8).argmax(1)  # (N, L): the first exit that stops the sample
    preds = stats.exit_preds.gather(1, first)
    ref = (stats.final_preds if kind == "disagreement" else stats.labels)[:, None]
    return exited.sum(0).tolist(), (exited & (preds != ref)).sum(0).tolist()


def risk_pvalues(exited: list[int], bad: list[int], n: int, eps: float, form: str
                 ) -> tuple[list[float], list[float]]:
    """(empirical risks, p-values of H: risk > eps) in the conditional (m = exited) or joint (all n) form."""
    ms = list(exited) if form == "conditional" else [n] * len(exited)
    return [b / m if m else 0.0 for b, m in zip(bad, ms)], hb_pvalue(list(bad), ms, eps)


def threshold_sequence(fit_entropies: torch.Tensor, lambdas) -> list[tuple[float, ...]]:
    """Per lam, every exit's threshold = the lam-quantile of that exit's entropies (the joint sequence)."""
    q = torch.tensor([float(v) for v in lambdas], dtype=torch.float64)
    per_exit = [torch.quantile(fit_entropies[:, j].double(), q) for j in range(fit_entropies.shape[1])]
    return [tuple(float(t[i]) for t in per_exit) for i in range(len(q))]


@dataclass
class LTTResult:
    rejected: int  # leading hypotheses rejected; the chosen one is rejected - 1 (none when 0)
    table: list[dict]  # per lam: lambda, thresholds, exit_fraction, risk_hat, p_value

    @property
    def chosen(self) -> dict | None:
        return self.table[self.rejected - 1] if self.rejected else None


def learn_then_test(stats: ExitStats, sequence, lambdas, eps: float, delta: float, kind: str = "disagreement",
                    form: str = "conditional", entropies: torch.Tensor | None = None) -> LTTResult:
    """Fixed-sequence Learn-then-Test over ``sequence`` (thresholds, strict to lenient) on ``stats`` (with
    these exit-rule ``entropies``, e.g. tempered; default: temperature 1)."""
    check_risk_args(eps, delta, kind, form)
    n = len(stats.labels)
    exited, bad = risk_counts(stats, sequence, kind, entropies)
    risks, ps = risk_pvalues(exited, bad, n, eps, form)
    table = [{"lambda": float(lam), "thresholds": list(thr), "exit_fraction": e / max(n, 1), "exited": e,
              "risk_hat": r, "p_value": p} for lam, thr, e, r, p in zip(lambdas, sequence, exited, risks, ps)]
    return LTTResult(fixed_sequence(ps, delta), table)


def split_fit_test(n: int, fit_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < fit_fraction < 1:
        raise ConfigError(f"fit_fraction={fit_fraction}: must be in (0, 1)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(fit_fraction * n))
    return perm[:k], perm[k:]


def ltt_policy(stats: ExitStats, eps: float, delta: float, kind: str = "disagreement", form: str = "conditional",
               temperature: bool = False, fit_fraction: float = 0.2, seed: int = 0, n_lambdas: int = 100,
               lambda_min: float = 0.01) -> tuple[ExitPolicy, LTTResult]:
    """Thresholds (and temperatures) certified by Learn then Test on validation outputs (module docstring).

    ``stats``: one full pass over the validation split (every exit's logits, final predictions, labels).
    Raises TargetUnreachableError when not even the strictest lam passes the test."""
    check_risk_args(eps, delta, kind, form)
    k = stats.exit_logits.shape[1]
    if k == 0:
        raise ConfigError("this network has no exits: there is nothing to calibrate")
    labels = stats.labels
    fit, test = split_fit_test(len(labels), fit_fraction, seed)
    temps = fit_temperatures(stats.exit_logits[fit], labels[fit]) if temperature else (1.0,) * k
    ent = stats.entropies_at(temps)
    lambdas = torch.linspace(lambda_min, 1.0, n_lambdas).tolist()
    start = _start(stats, fit, ent, threshold_sequence(ent[fit], lambdas), len(test), eps, delta, form)
    lambdas = lambdas[start:]
    sequence = threshold_sequence(ent[fit], lambdas)
    held = ExitStats(stats.exit_logits[test], stats.final_preds[test], labels[test])
    res = learn_then_test(held, sequence, lambdas, eps, delta, kind, form, ent[test])
    if res.chosen is None:
        first = res.table[0]
        raise TargetUnreachableError(
            f"Learn then Test certifies no thresholds for {kind} risk <= {eps} at delta {delta} on {len(test)} "
            f"samples (strictest lam {first['lambda']:.3f}: risk {first['risk_hat']:.4f}, p {first['p_value']:.3g}): "
            f"raise --risk or --delta")
    c = res.chosen
    idx = sorted({max(0, round(res.rejected * (i + 1) / MAX_LEVELS) - 1) for i in range(MAX_LEVELS)})
    guarantee = {
        "method": "learn-then-test", "p_value": "hoeffding-bentkus", "testing": "fixed-sequence", "risk": kind,
        "form": form, "eps": eps, "delta": delta, "n": len(test), "n_fit": len(fit), "split": "val",
        "lambda": c["lambda"], "lambda_start": lambdas[0], "risk_hat": c["risk_hat"], "p_chosen": c["p_value"],
        "exited": c["exited"],
        "statement": statement(kind, form, eps, delta),
        "levels": [res.table[i]["thresholds"] for i in idx],  # strict -> lenient, last = chosen; all certified
    }
    chosen_by = {"method": "ltt", "split": "val", "n": len(labels), "n_fit": len(fit), "seed": seed,
                 "fit_fraction": fit_fraction, "temperature": "fitted" if temperature else "none",
                 "lambdas": [lambda_min, 1.0, n_lambdas], "exit_fraction": c["exit_fraction"]}
    return ExitPolicy(tuple(c["thresholds"]), temps if temperature else (), chosen_by, guarantee), res


def _start(stats: ExitStats, fit, ent, sequence, n_test: int, eps, delta, form) -> int:
    """Where the fixed sequence starts, chosen on the fit part only. Conditional form: the first lam whose exit
    share on the fit part promises the test part 5x the fewest exited samples a test can pass with; stricter lam
    would end the sequence at once for want of samples, however small their risk. Joint form: the first lam."""
    if form == "joint":
        return 0
    need = 5 * min_samples(eps, delta)
    fit_stats = ExitStats(stats.exit_logits[fit], stats.final_preds[fit], stats.labels[fit])
    exited, _ = risk_counts(fit_stats, sequence, "disagreement", ent[fit])
    return next((i for i, e in enumerate(exited) if e / max(len(fit), 1) * n_test >= need), len(sequence) - 1)


def statement(kind: str, form: str, eps: float, delta: float) -> str:
    what = "the edge's answer differs from the full network's" if kind == "disagreement" else \
        "the edge's answer is wrong"
    share = (f"among samples that exit, the probability that {what}" if form == "conditional"
             else f"the probability that a sample exits and {what}")
    return (f"with probability >= {1 - delta:g} over the validation draw, {share} is <= {eps:g}, "
            f"on data exchangeable with the validation split")
