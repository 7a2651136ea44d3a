"""The audited edge's controller on synthetic streams whose disagreement is known."""

import pytest
import torch

from hybridexit.errors import ConfigError
from hybridexit.model.policy import ExitPolicy
from hybridexit.runtime.audit import (
    HIGH_RATIOS,
    LOW_RATIOS,
    AuditController,
    AuditSettings,
    MixtureTest,
    ShareCUSUM,
    ladder,
    policy_eps,
    reference_share,
    simulate_audited,
)

LEVELS = [(0.05,), (0.1,), (0.3,), (0.6,)]  # level 4 = the calibrated thresholds
EPS = 0.05


def _stream(n, slope, g, hmax=1.0):
    """One exit with entropy h ~ U(0, hmax) that predicts class 0; the full network says 1 (disagrees) with
    probability slope * h. Share of disagreeing exits at threshold t <= hmax: slope * t / 2; exit share t / hmax."""
    h = torch.rand(n, 1, generator=g) * hmax
    final = (torch.rand(n, generator=g) < slope * h[:, 0]).long()
    return torch.zeros(n, 1, dtype=torch.long), final, h


def _cat(*parts):
    return tuple(torch.cat(x) for x in zip(*parts))


def _controller(rate=0.05, seed=0):
    return AuditController(list(LEVELS), AuditSettings(rate=rate, eps=EPS, seed=seed))


def test_clean_stream_audit_changes_no_decision():
    preds, final, h = _stream(20_000, 0.05, torch.Generator().manual_seed(0))  # 1.5 % at the top level
    ctl = _controller()
    recs = simulate_audited(preds, final, h, ctl)
    assert ctl.adaptations == [] and ctl.audits > 200
    exited = (h[:, 0] < LEVELS[-1][0])
    assert [r["decided_at"] for r in recs] == torch.where(exited, 0, -1).tolist()
    assert [r["prediction"] for r in recs] == torch.where(exited, preds[:, 0], final).tolist()
    assert all(r["thresholds"] == [0.6] for r in recs)
    assert ctl.audits == sum(r["audited"] for r in recs) and 0.03 < ctl.audits / int(exited.sum()) < 0.07
    est = ctl.estimate()  # the running estimate: the last `window` audits and their exact upper bound
    window = [r["disagrees"] for r in recs if r["audited"]][-500:]
    assert est["audits"] == len(window) and est["disagreements"] == sum(window)
    realized = float((final[exited] != 0).float().mean())
    assert est["share"] <= est["upper_bound"] < EPS and realized <= est["upper_bound"]


def test_shift_midway_is_detected_and_every_input_keeps_its_record():
    g = torch.Generator().manual_seed(1)
    clean, shifted = _stream(5000, 0.05, g), _stream(15_000, 1.0, g)  # shifted: 30 % at the top level
    preds, final, h = _cat(clean, shifted)
    ctl = _controller()
    recs = simulate_audited(preds, final, h, ctl)
    assert [r["index"] for r in recs] == list(range(20_000))  # one record per input, in order
    first = ctl.adaptations[0]
    assert first.kind == "tighten" and 5000 <= first.index < 5000 + 2000  # stated: first step within 2000 inputs
    last_tighten = max(a.index for a in ctl.adaptations if a.kind == "tighten")
    assert last_tighten < 5000 + 8000  # stated: settled (at level 2, 5 % disagreement) within 8000 inputs
    after = [r for r in recs[last_tighten + 1:] if r["decided_at"] >= 0]
    share = sum(r["prediction"] != f for r, f in zip(after, final[[r["index"] for r in after]].tolist())) / len(after)
    assert share <= EPS + 0.02  # after adapting, the exits' disagreement is back near eps (30 % before)
    for r in recs:  # every record names the thresholds that decided it
        assert r["thresholds"] == list(ctl.levels[r["level"]])


def test_back_to_clean_relaxes_to_the_calibrated_level():
    g = torch.Generator().manual_seed(2)
    preds, final, h = _cat(_stream(2000, 0.05, g), _stream(6000, 1.0, g), _stream(40_000, 0.02, g))
    ctl = _controller(rate=0.1)
    simulate_audited(preds, final, h, ctl)
    kinds = [a.kind for a in ctl.adaptations]
    assert "tighten" in kinds and "relax" in kinds and ctl.level == ctl.top


def test_level_zero_stops_exiting_and_audits_for_free():
    g = torch.Generator().manual_seed(3)
    preds, final, h = _stream(20_000, 4.0, g)  # every level is bad: 10 % at level 1
    ctl = _controller(rate=0.3)  # level 1 exits 5 % of the inputs: audits there need a higher rate
    recs = simulate_audited(preds, final, h, ctl)
    assert ctl.level == 0 and ctl.free_audits > 0
    zero = [r for r in recs if r["level"] == 0]
    assert zero and all(r["decided_at"] == -1 and r["thresholds"] == [0.0] for r in zero)
    assert all(r["prediction"] == f for r, f in zip(recs, final.tolist()) if r["level"] == 0)
    sent = sum(r["audited"] for r in recs if r["level"] > 0)
    assert ctl.audits == sent  # free audits are not counted as sent


@pytest.mark.parametrize("ratios,p", [(HIGH_RATIOS, 0.05), (LOW_RATIOS, 0.05), (HIGH_RATIOS, 0.03)])
def test_mixture_test_false_alarms_stay_under_delta(ratios, p):
    """On the null's boundary (p = eps) and inside it, the mixture test ever reaches 1/delta over 2,000 outcomes in
    at most delta of 300 seeded runs (plus three binomial standard deviations)."""
    import math
    import random

    rng, fired, delta = random.Random(0), 0, 0.05
    for _ in range(300):
        m = MixtureTest(0.05, ratios)
        for _ in range(2000):
            m.update(rng.random() < (p if ratios is HIGH_RATIOS else 0.05))
            if m.log_evidence() >= math.log(1 / delta):
                fired += 1
                break
    assert fired / 300 <= delta + 3 * math.sqrt(delta * (1 - delta) / 300)


def test_share_cusum_alarms_on_a_drop_and_not_on_the_reference():
    g = torch.Generator().manual_seed(5)
    cusum = ShareCUSUM(0.6, 0.15, 100_000)
    assert not any(cusum.update(bool(x)) for x in (torch.rand(50_000, generator=g) < 0.6).tolist())
    alarms = [i for i, x in enumerate((torch.rand(2000, generator=g) < 0.4).tolist()) if cusum.update(bool(x))]
    assert alarms and alarms[0] < 300


def _burst_run(seed, burst):
    g = torch.Generator().manual_seed(10 + seed)
    # 5,000 clean inputs (exit share 0.6, 1.5 % disagreement), then a shift: fewer exit (0.4) and those that do
    # disagree 9 % of the time at the calibrated level (4.5 % at level 3)
    preds, final, h = _cat(_stream(5000, 0.05, g), _stream(15_000, 0.3, g, hmax=1.5))
    ctl = AuditController(list(LEVELS), AuditSettings(rate=0.05, eps=EPS, seed=seed, burst_rate=burst),
                          reference_share=0.6 if burst else None)
    return ctl, simulate_audited(preds, final, h, ctl)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_drift_burst_finds_a_mild_excess_that_the_base_rate_misses(seed):
    """A 9 % disagreement (eps 5 %) at 5 % audits gives about 20 audits per 1,000 inputs: not enough to act within
    15,000 inputs. The exit share dropping from 0.6 to 0.4 raises a drift alarm within 500 inputs, the burst (50 %)
    audits, and the exits tighten within 3,000 inputs of the shift; every input keeps its record."""
    plain, _ = _burst_run(seed, None)
    assert plain.adaptations == []
    ctl, recs = _burst_run(seed, 0.5)
    assert [r["index"] for r in recs] == list(range(20_000))
    assert len(ctl.drift_alarms) == 1 and 5000 <= ctl.drift_alarms[0] < 5500
    first = ctl.adaptations[0]
    assert first.kind == "tighten" and first.index < 8000 and ctl.burst_audits_taken == 600
    assert sum(r.get("drift_alarm", False) for r in recs) == 1


def test_a_burst_on_a_clean_stream_never_starts_and_needs_a_reference_share():
    preds, final, h = _stream(20_000, 0.05, torch.Generator().manual_seed(7))
    ctl = AuditController(list(LEVELS), AuditSettings(rate=0.05, eps=EPS, burst_rate=0.5), reference_share=0.6)
    plain = simulate_audited(preds, final, h, _controller())
    assert simulate_audited(preds, final, h, ctl) == plain and ctl.drift_alarms == []
    with pytest.raises(ConfigError, match="exit share"):
        AuditController(list(LEVELS), AuditSettings(rate=0.05, eps=EPS, burst_rate=0.5))
    with pytest.raises(ConfigError, match="burst-rate"):
        AuditSettings(rate=0.05, eps=EPS, burst_rate=0.01)
    assert reference_share(ExitPolicy((0.6,), (), {"exit_fraction": 0.625})) == 0.625
    assert reference_share(ExitPolicy((0.6, 0.3), (), {"exit_fraction": [0.4, 0.2]})) == pytest.approx(0.6)
    assert reference_share(ExitPolicy((0.6,))) is None


def test_ladder_and_eps_from_the_policy():
    ltt = ExitPolicy((0.6,), (), {}, {"eps": 0.05, "levels": [[0.1], [0.3], [0.6]]})
    assert ladder(ltt) == [(0.1,), (0.3,), (0.6,)] and policy_eps(ltt) == 0.05
    plain = ExitPolicy((0.8, 0.4))
    assert ladder(plain) == [(0.2, 0.1), (0.4, 0.2), (0.6000000000000001, 0.30000000000000004), (0.8, 0.4)]
    assert policy_eps(plain, 0.1) == 0.1
    with pytest.raises(ConfigError, match="--audit-eps"):
        policy_eps(plain)
    with pytest.raises(ConfigError, match="audit-rate"):
        AuditSettings(rate=0.0, eps=0.05)


# ---------------------------------------------------------------------------------------------- over the network
def test_audited_edge_over_a_real_server(tmp_path):
    """A real loopback server and the edge runtime with --audit-rate 1: the audit's outcomes are the in-process
    disagreements, the exits tighten down to level 0 (a random network disagrees everywhere), every input keeps
    one record naming its thresholds, and the server counts the same audits. With an EPS nothing can exceed,
    the audit changes no decision."""
    from test_runtime import MEAN, N_IMAGES, STD, ThreadServer  # the runtime tests' tiny setup

    from hybridexit.data import Inputs, Split
    from hybridexit.model.checkpoint import fingerprint, load_model, save_model
    from hybridexit.model.hybrid import HybridNet
    from hybridexit.model.policy import write_policy
    from hybridexit.model.resnet import HybridConfig
    from hybridexit.runtime.client import EdgeOptions, EdgeRunner, run_edge
    from hybridexit.runtime.server import ServerSettings
    from hybridexit.runtime.summary import format_summary
    from hybridexit.runtime.transport import CloudClient

    torch.manual_seed(0)
    model = HybridNet(HybridConfig(depth=8, num_classes=10, edge_layers=4, edge_bits=1, exits=(2, 4), mean=MEAN,
                                   std=STD)).eval()
    g = torch.Generator().manual_seed(1)
    images = Split(torch.randint(0, 256, (N_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (N_IMAGES,), generator=g), "test")
    with torch.no_grad():
        outs = model(images.images)
    path = tmp_path / "tiny"
    save_model(path, model, {"data": {"name": "cifar10", "mean": list(MEAN), "std": list(STD)}})
    # everything exits at exit 0; one certified level (so the audit's ladder is: level 1 = this, level 0 = no exits)
    write_policy(path, ExitPolicy((9.0, 9.0), (), {"exit_fraction": 1.0}, {"eps": 0.05, "levels": [[9.0, 9.0]]}))
    full = outs[-1].argmax(1).tolist()
    srv = ThreadServer(path, ServerSettings(max_batch=16, max_wait_ms=1))
    try:
        model, meta = load_model(path)
        plain = EdgeRunner(model, meta["policy"], fingerprint(path), EdgeOptions(srv.url)).run(images.images,
                                                                                             images.labels)
        calm = EdgeRunner(model, meta["policy"], fingerprint(path),
                          EdgeOptions(srv.url, audit_rate=1.0, audit_eps=0.99)).run(images.images, images.labels)
        assert [(r["prediction"], r["decided_at"]) for r in calm] == [(r["prediction"], r["decided_at"]) for r in plain]
        summary, recs = run_edge(path, Inputs(images.images, images.labels), EdgeOptions(srv.url, audit_rate=1.0))
        bursty, _ = run_edge(path, Inputs(images.images, images.labels),  # every input exits, as on "validation"
                             EdgeOptions(srv.url, audit_rate=0.5, audit_burst_rate=1.0, audit_eps=0.99))
        stats = CloudClient(srv.url).stats()
    finally:
        srv.stop()
    assert [r["index"] for r in recs] == list(range(N_IMAGES))
    assert summary["audit_eps"] == 0.05 and summary["audit_level"] == 0 and summary["adaptations"] == 1
    # four disagreeing audits in a row take the mixture test past 2 / delta = 40 (mean of r^4 over HIGH_RATIOS: 146)
    assert summary["audit_events"][0]["index"] == 3 and "disagreement now" in format_summary(summary)
    assert summary["audits"] == 4 and summary["free_audits"] == N_IMAGES - 4 and summary["audit_cloud_uj"] > 0
    for r, p, f in zip(recs, [r["prediction"] for r in plain], full):
        assert r["thresholds"] == ([9.0, 9.0] if r["audit_level"] else [0.0, 0.0]) and r["audited"]  # rate 1
        if r["audit_level"] > 0:
            assert r["audit_disagrees"] == (p != f) and r["prediction"] == p and r["decided_at"] == "exit:0"
        else:  # no exits: the cloud answers
            assert r["decided_at"] == "cloud" and r["prediction"] == f
    assert bursty["drift_alarms"] == 0 and bursty["burst_audits"] == 0 and "drift bursts" in format_summary(bursty)
    sent = sum(r["audited"] for r in recs)
    assert stats["audit_samples"] == sent + sum(r["audited"] for r in calm) + bursty["audits"]
    assert stats["audit_disagreements"] == sum(r["audit_disagrees"] for r in recs + calm) + bursty[
        "audit_disagreements"]
    assert stats["audit_levels"] and stats["audit_cloud_uj"] > 0
