"""Learn then Test on synthetic data whose risk is known in closed form."""

import math

import pytest
import torch

from hybridexit.calibration.risk import (
    binom_cdf,
    fixed_sequence,
    hb_pvalue,
    learn_then_test,
    ltt_policy,
    risk_counts,
)
from hybridexit.calibration.stats import ExitStats
from hybridexit.errors import ConfigError, TargetUnreachableError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


GRID = torch.linspace(0.05, 1.0, 96).tolist()  # thresholds = lambdas: entropy ~ U(0, 1) below


def _draw(n, g):
    """One exit, entropy h ~ U(0, 1) (given directly to the test); the exit predicts class 0 and disagrees with
    the final prediction with probability h. Conditional risk at threshold t: P(disagree | h < t) = t / 2;
    joint risk: P(h < t, disagree) = t^2 / 2. Returns (stats, entropies)."""
    h = torch.rand(n, 1, generator=g, dtype=torch.float64)
    dis = (torch.rand(n, generator=g, dtype=torch.float64) < h[:, 0]).long()
    logits = torch.tensor([1.0, 0.0]).repeat(n, 1, 1)  # (n, 1, 2), argmax 0
    return ExitStats(logits, dis, dis.clone()), h


def test_binomial_cdf_and_pvalue():
    n, p = 30, 0.2
    brute = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(8))
    assert binom_cdf(7, n, p) == pytest.approx(brute, rel=1e-9)
    assert binom_cdf(-1, n, p) == 0.0 and binom_cdf(n, n, p) == 1.0
    assert binom_cdf([7, -1, 30, 3], [30, 30, 30, 2], p) == pytest.approx([brute, 0.0, 1.0, 1.0], rel=1e-9)
    assert hb_pvalue(0, 0, 0.1) == 1.0
    assert hb_pvalue(0, 200, 0.1) < 1e-8 < hb_pvalue(20, 200, 0.1)
    # valid p-value: under a risk exactly at eps, P(p <= delta) <= delta
    g = torch.Generator().manual_seed(0)
    draws = torch.binomial(torch.full((4000,), 200.0), torch.full((4000,), 0.1), generator=g).long().tolist()
    assert sum(hb_pvalue(k, 200, 0.1) <= 0.1 for k in draws) / len(draws) <= 0.1


def test_fixed_sequence_stops_at_the_first_failure():
    assert fixed_sequence([0.01, 0.02, 0.5, 0.01], 0.05) == 2
    assert fixed_sequence([0.5, 0.01], 0.05) == 0
    assert fixed_sequence([0.01, 0.01], 0.05) == 2


@pytest.mark.parametrize("form,eps,true_risk", [("conditional", 0.1, lambda t: t / 2),
                                                ("joint", 0.02, lambda t: t * t / 2)])
def test_ltt_controls_the_risk_in_repeated_trials(form, eps, true_risk):
    delta, trials, n = 0.1, 200, 2000
    g = torch.Generator().manual_seed(1)
    fresh, fresh_h = _draw(200_000, torch.Generator().manual_seed(2))
    ltt_bad = naive_bad = fresh_bad = 0
    chosen = []
    for _ in range(trials):
        stats, h = _draw(n, g)
        res = learn_then_test(stats, [(t,) for t in GRID], GRID, eps, delta, "disagreement", form, h)
        t = res.chosen["thresholds"][0] if res.chosen else 0.0
        ltt_bad += true_risk(t) > eps
        chosen.append(t)
        (exited,), (bad,) = risk_counts(fresh, [(t,)], "disagreement", fresh_h)
        fresh_bad += (bad / max(exited if form == "conditional" else len(fresh.labels), 1)) > eps
        ok = [row["thresholds"][0] for row in res.table if row["risk_hat"] <= eps]  # no test: empirical risk only
        naive_bad += true_risk(max(ok)) > eps
    assert ltt_bad / trials <= delta and fresh_bad / trials <= delta
    assert sum(chosen) / trials > 0.1  # the largest safe threshold is 0.2: LTT finds useful ones, not just 0
    assert naive_bad / trials > 2 * delta  # the same trials without the test break the bound: the check has teeth


def test_vectorized_counts_follow_the_exit_rule():
    stats = _logits(500, torch.Generator().manual_seed(6))
    temps = (1.3, 0.7)
    ents = stats.entropies_at(temps)
    seq = [(float(a), float(b)) for a, b in torch.rand(20, 2, generator=torch.Generator().manual_seed(7)) * 2]
    for kind, ref in (("disagreement", stats.final_preds), ("label", stats.labels)):
        exited, bad = risk_counts(stats, seq, kind, ents)
        for thr, e, b in zip(seq, exited, bad):
            preds, decided = stats.simulate(thr, temps)
            assert e == int((decided >= 0).sum()) and b == int(((decided >= 0) & (preds != ref)).sum())


def _logits(n, g, k=2, c=10):
    """Two exits of increasing quality; the final prediction is the label 90 % of the time."""
    y = torch.randint(0, c, (n,), generator=g)
    final = torch.where(torch.rand(n, generator=g) < 0.9, y, torch.randint(0, c, (n,), generator=g))
    a = 4 * torch.rand(n, 1, generator=g)
    z = torch.stack([a * (j + 1) * torch.nn.functional.one_hot(final, c) + 1.5 * torch.randn(n, c, generator=g)
                     for j in range(k)], 1)
    return ExitStats(z, final, y)


def test_ltt_policy_two_exits_jointly_with_temperatures():
    eps, delta, trials = 0.1, 0.1, 25
    g = torch.Generator().manual_seed(3)
    fresh = _logits(40_000, torch.Generator().manual_seed(4))
    violations = 0
    for _ in range(trials):
        pol, res = ltt_policy(_logits(2000, g), eps, delta, temperature=True)
        (exited,), (bad,) = risk_counts(fresh, [pol.thresholds], "disagreement", fresh.entropies_at(pol.temperatures))
        assert exited > 0.1 * len(fresh.labels)  # a useful policy, not the trivial one
        violations += bad / exited > eps
    assert violations / trials <= delta
    assert len(pol.thresholds) == len(pol.temperatures) == 2
    gu = pol.guarantee
    assert gu["eps"] == eps and gu["delta"] == delta and gu["n"] == 1600 and gu["n_fit"] == 400
    assert gu["risk"] == "disagreement" and gu["form"] == "conditional" and gu["levels"][-1] == list(pol.thresholds)
    assert gu["lambda"] == res.chosen["lambda"] and "probability >= 0.9" in gu["statement"]


def test_ltt_policy_refuses_what_it_cannot_certify():
    stats = _logits(300, torch.Generator().manual_seed(5))
    with pytest.raises(TargetUnreachableError, match="raise --risk"):
        ltt_policy(stats, 0.001, 0.01)
    with pytest.raises(ConfigError, match="fraction"):
        ltt_policy(stats, 5.0, 0.1)
    with pytest.raises(ConfigError):
        ltt_policy(stats, 0.1, 0.1, kind="other")


def test_calibrate_cli_writes_a_certified_policy(tmp_path, tiny_cifar):
    """End to end on a tiny trained checkpoint: `calibrate --risk` is a dry run unless --write; the written policy
    carries the guarantee and the fitted temperatures; the test split is never read."""
    import json
    import warnings

    from hybridexit import HybridConfig
    from hybridexit.cli import main
    from hybridexit.data import load_cifar
    from hybridexit.model.policy import read_policy
    from hybridexit.workflows.train import TrainConfig, train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
        train(tmp_path / "ck", HybridConfig(depth=8, edge_layers=4, edge_bits=1, exits=(2, 4)),
              TrainConfig(epochs=2, batch_size=32, val_size=100, lr=0.05), ds, progress=False)
    args = ["calibrate", str(tmp_path / "ck"), "--data-dir", str(tiny_cifar), "--risk", "0.6", "--delta", "0.5",
            "--risk-kind", "label", "--temperature", "--json"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0 and read_policy(tmp_path / "ck") is None
        assert main([*args, "--write"]) == 0
    pol = read_policy(tmp_path / "ck")
    g = pol.guarantee
    assert g["method"] == "learn-then-test" and g["risk"] == "label" and g["eps"] == 0.6 and g["delta"] == 0.5
    assert g["n"] == 80 and len(pol.temperatures) == 2 and pol.chosen_by["method"] == "ltt"
    assert json.dumps(pol.to_dict())  # the record is plain JSON
