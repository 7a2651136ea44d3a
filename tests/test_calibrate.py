import warnings

import pytest

from hybridexit import ConfigError, HybridConfig
from hybridexit.calibration.calibrate import (
    OperatingPoint,
    calibrate_checkpoint,
    choose,
    choose_in_order,
    sweep,
    validation_split,
)
from hybridexit.calibration.stats import collect_exit_stats
from hybridexit.data import load_cifar
from hybridexit.model.checkpoint import load_model
from hybridexit.model.energy import energy_report
from hybridexit.model.policy import policy_history, read_policy
from hybridexit.workflows.evaluate import evaluate_conditional
from hybridexit.workflows.train import TrainConfig, train

NET = HybridConfig(depth=8, edge_layers=4, edge_bits=1, exits=(2, 4))


@pytest.fixture
def trained(tmp_path, tiny_cifar):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    train(tmp_path / "ck", NET, TrainConfig(epochs=2, batch_size=32, val_size=60, lr=0.05), ds, progress=False)
    return tmp_path / "ck", ds


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"calibration touched the test split ({name})")

    def __len__(self):
        raise AssertionError("calibration touched the test split")


def test_calibration_never_touches_test_split_and_writes_the_policy_only_when_asked(trained, tmp_path):
    path, ds = trained
    ds.test = Untouchable()
    dry = calibrate_checkpoint(path, ds, "max_drop", 0.0, plot_path=tmp_path / "c.png")
    assert dry["split"] == "val" and dry["n"] == 60 and not dry["written"] and read_policy(path) is None
    assert (tmp_path / "c.png").stat().st_size > 1000
    res = calibrate_checkpoint(path, ds, "max_drop", 0.0, write=True)
    assert res == dict(dry, written=True) and res["previous_thresholds"] is None
    policy = read_policy(path)
    assert list(policy.thresholds) == res["thresholds"] and policy.chosen_by["target"] == "max_drop"
    assert policy.chosen_by["split"] == "val" and policy.chosen_by["data_checksum"] == ds.content
    assert policy.chosen_by["exit_fraction"] == res["exit_fraction"]  # the audit's drift reference (bursts)
    assert res["accuracy"] >= res["cloud_accuracy"] - 1e-9
    again = calibrate_checkpoint(path, ds, "exit_fraction", 0.9, write=True)  # the previous policy is kept
    assert again["previous_thresholds"] == res["thresholds"]
    assert [h["thresholds"] for h in policy_history(path)] == [res["thresholds"]]


def test_simulated_decisions_equal_conditional_run(trained):
    path, ds = trained
    model, _ = load_model(path)
    val = validation_split(path, ds)
    stats = collect_exit_stats(model, val)
    for thr in ([0.0, 0.0], [1e9, 0.0], [float(stats.entropies[:, 0].median()), float(stats.entropies[:, 1].median())]):
        preds, decided = stats.simulate(thr)
        recs = evaluate_conditional(model, val, thr, batch_size=16)
        assert [r.prediction for r in recs] == preds.tolist()
        assert [-1 if r.exit is None else r.exit for r in recs] == decided.tolist()


def test_targets(trained):
    path, ds = trained
    model, _ = load_model(path)
    stats = collect_exit_stats(model, validation_split(path, ds))
    report = energy_report(model.cfg)
    pts = sweep(stats, report, grid=8)
    half = choose(pts, "exit_fraction", 0.5, stats.cloud_accuracy)
    assert half.edge_fraction <= 0.5 + 1e-9
    assert all(p.edge_fraction <= half.edge_fraction + 1e-9 for p in pts if p.edge_fraction <= 0.5)
    accs = sorted({p.accuracy for p in pts})
    floor = accs[len(accs) // 2]  # a floor that excludes some points
    assert any(p.accuracy < floor for p in pts)
    cheap = choose(pts, "min_accuracy", floor, stats.cloud_accuracy)
    assert cheap.accuracy >= floor
    assert cheap.expected_uj == pytest.approx(min(p.expected_uj for p in pts if p.accuracy >= floor))
    # (the synthetic points below check that a cheaper point under the floor is passed over)
    synthetic = [OperatingPoint((0.1,), 0.80, [0.7], 10.0), OperatingPoint((0.5,), 0.85, [0.5], 20.0),
                 OperatingPoint((0.0,), 0.9, [0.0], 50.0)]
    with pytest.raises(ConfigError, match="lower --min-accuracy"):
        choose(synthetic, "min_accuracy", 0.95, 0.9)
    assert choose(synthetic, "min_accuracy", 0.84, 0.9).thresholds == (0.5,)
    assert choose(synthetic, "max_drop", 0.05, 0.9).thresholds == (0.5,)
    assert choose(synthetic, "max_drop", 0.10, 0.9).thresholds == (0.1,)
    with pytest.raises(ConfigError):
        choose(pts, "exit_fraction", 1.5, stats.cloud_accuracy)


def test_unreachable_target_uses_the_fallback(trained):
    path, ds = trained
    model, _ = load_model(path)
    stats = collect_exit_stats(model, validation_split(path, ds))
    assert max(p.accuracy for p in sweep(stats, energy_report(model.cfg))) < 1.0  # so a floor of 1.0 is unreachable
    with pytest.raises(ConfigError, match="lower --min-accuracy"):
        calibrate_checkpoint(path, ds, "min_accuracy", 1.0, write=False)
    res = calibrate_checkpoint(path, ds, "min_accuracy", 1.0, write=False, fallback=("max_drop", 0.01))
    direct = calibrate_checkpoint(path, ds, "max_drop", 0.01, write=False)
    assert res["target"] == "max_drop" and res["value"] == 0.01 and res == direct
    with pytest.raises(ConfigError, match="fraction, not a percentage"):  # a bad value is not "unreachable"
        calibrate_checkpoint(path, ds, "min_accuracy", 90.0, write=False, fallback=("max_drop", 0.01))


def test_a_calibration_chain_takes_its_first_target_that_is_met():
    from hybridexit.errors import TargetUnreachableError

    # final classifier 0.80; exits cost nothing up to 50 % at the edge, then accuracy falls
    pts = [OperatingPoint((t,), acc, [edge], 100 - 80 * edge) for t, acc, edge in
           ((0.1, 0.80, 0.0), (0.3, 0.81, 0.3), (0.5, 0.80, 0.5), (0.7, 0.78, 0.65), (0.9, 0.70, 0.9))]
    floor, no_cost, at_62 = ("min_accuracy", 0.85), ("max_drop", 0.0, 0.62), ("exit_fraction", 0.62)
    assert choose_in_order(pts, [floor, no_cost, at_62], 0.80)[:2] == ("exit_fraction", 0.62)  # 50 % < 62 %
    target, value, p = choose_in_order(pts, [floor, ("max_drop", 0.0, 0.4), at_62], 0.80)
    assert (target, value, p.thresholds) == ("max_drop", 0.0, (0.5,))  # the most exits that cost nothing
    assert choose_in_order(pts, [("min_accuracy", 0.8), no_cost], 0.80)[2].thresholds == (0.5,)  # primary met
    with pytest.raises(TargetUnreachableError):
        choose_in_order(pts, [floor], 0.80)
