"""Exit thresholds chosen on held-out validation data (never the test split) for a target.

Targets (one of):
- ``max_drop``: the most samples exiting while accuracy stays within ``max_drop`` of ``cloud_accuracy``
  (the accuracy of the final classifier with nothing exiting), both measured on the validation split;
- ``exit_fraction``: the thresholds whose exit fraction is closest to (and not above) the given fraction,
  with the best accuracy among those;
- ``min_accuracy``: the lowest expected energy per image with accuracy at least ``min_accuracy``.

The candidate thresholds for one exit are every midpoint between consecutive distinct validation entropies
(so the search is exact); with several exits, a grid of entropy quantiles per exit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..errors import ConfigError, TargetUnreachableError
from ..model.checkpoint import validation_split
from ..model.energy import EnergyReport
from .stats import ExitStats

TARGETS = ("max_drop", "exit_fraction", "min_accuracy")


@dataclass
class OperatingPoint:
    thresholds: tuple[float, ...]
    accuracy: float
    exit_fraction: list[float]
    expected_uj: float

    @property
    def edge_fraction(self) -> float:
        return sum(self.exit_fraction)

    def to_dict(self, report: EnergyReport) -> dict:
        return {"thresholds": list(self.thresholds), "accuracy": self.accuracy, "exit_fraction": self.exit_fraction,
                "edge_fraction": self.edge_fraction, "expected_uj": self.expected_uj,
                "reduction": report.fp32_uj / self.expected_uj}


def candidates(ent: torch.Tensor, grid: int | None = None) -> list[float]:
    """Thresholds between distinct entropies (all of them, or ``grid`` quantiles), plus 0 (no exit) and inf."""
    u = torch.unique(ent.double())
    if grid is not None and len(u) > grid:
        u = torch.quantile(ent.double(), torch.linspace(0, 1, grid, dtype=torch.float64)).unique()
    mids = ((u[1:] + u[:-1]) / 2).tolist()
    return [0.0, *mids, float(u[-1]) + 1e-6 if len(u) else 1.0]


def sweep(stats: ExitStats, report: EnergyReport, grid: int = 24, temperatures=None) -> list[OperatingPoint]:
    """Every candidate threshold setting with its validation accuracy, exit fractions and expected energy."""
    ents = stats.entropies_at(temperatures)
    k = ents.shape[1]
    if k == 0:
        raise ConfigError("this network has no exits: there is nothing to calibrate")
    per_exit = [candidates(ents[:, j], None if k == 1 else grid) for j in range(k)]
    n = len(stats.labels)
    points = []
    for thr in itertools.product(*per_exit):
        preds, decided = stats.simulate(thr, entropies=ents)
        fr = [float((decided == j).sum()) / n for j in range(k)]
        points.append(OperatingPoint(tuple(float(t) for t in thr), stats.accuracy(preds), fr, report.expected_uj(fr)))
    return points


def choose(points: list[OperatingPoint], target: str, value: float, cloud_accuracy: float) -> OperatingPoint:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    if target == "max_drop":
        if value < 0:
            raise ConfigError("max_drop must be >= 0 (a fraction, e.g. 0.01 for one point)")
        ok = [p for p in points if p.accuracy >= cloud_accuracy - value - 1e-12]
        return max(ok, key=lambda p: (p.edge_fraction, p.accuracy, -p.expected_uj))
    if target == "exit_fraction":
        if not 0 <= value <= 1:
            raise ConfigError("exit_fraction must be in [0, 1]")
        ok = [p for p in points if p.edge_fraction <= value + 1e-12]
        best = max(p.edge_fraction for p in ok)
        return max((p for p in ok if p.edge_fraction >= best - 1e-12), key=lambda p: (p.accuracy, -p.expected_uj))
    if not 0 <= value <= 1:
        raise ConfigError("min_accuracy must be in [0, 1] (a fraction, not a percentage)")
    ok = [p for p in points if p.accuracy >= value - 1e-12]
    if not ok:
        top = max(p.accuracy for p in points)
        raise TargetUnreachableError(f"no thresholds reach accuracy {value:.4f} on the validation split "
                                     f"(best {top:.4f}): lower --min-accuracy")
    return min(ok, key=lambda p: (p.expected_uj, -p.accuracy))


def _as_chain(fallback) -> list[tuple]:
    if fallback is None:
        return []
    return [tuple(fallback)] if isinstance(fallback[0], str) else [tuple(f) for f in fallback]


def choose_in_order(points: list[OperatingPoint], chain: list[tuple], cloud_accuracy: float) -> tuple[str, float, OperatingPoint]:
    """The first of ``chain``'s (target, value[, min_edge]) that can be met: (target, value, point). The last entry
    raises as ``choose`` does when it cannot be met; an earlier one is unmet when ``choose`` finds no point or
    the point decides less than its ``min_edge`` at the edge."""
    for target, value, *rest in chain[:-1]:
        try:
            best = choose(points, target, value, cloud_accuracy)
        except TargetUnreachableError:
            continue
        if not rest or best.edge_fraction >= rest[0] - 1e-12:
            return target, value, best
    target, value = chain[-1][:2]
    return target, value, choose(points, target, value, cloud_accuracy)


def plot(points: list[OperatingPoint], chosen: OperatingPoint, report: EnergyReport, cloud_accuracy: float, path) -> None:
    """Accuracy and expected energy against the fraction of samples decided at the edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p.edge_fraction)
    xs = [p.edge_fraction for p in pts]
    fig, ax1 = plt.subplots(figsize=(6.4, 4.2))
    ax1.plot(xs, [100 * p.accuracy for p in pts], ".", ms=2, color="tab:blue", label="accuracy")
    ax1.axhline(100 * cloud_accuracy, color="tab:blue", ls=":", lw=1, label="nothing exits")
    ax1.set_xlabel("fraction decided at the edge (validation)")
    ax1.set_ylabel("accuracy (%)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(xs, [report.fp32_uj / p.expected_uj for p in pts], ".", ms=2, color="tab:red")
    ax2.set_ylabel("energy reduction vs FP32 (x)", color="tab:red")
    ax1.axvline(chosen.edge_fraction, color="k", lw=1, ls="--")
    thr = ", ".join(f"{t:.3g}" for t in chosen.thresholds)
    ax1.set_title(f"{report.config.name}: chosen thresholds [{thr}]", fontsize=9)
    ax1.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibrate_checkpoint(path, ds, target: str, value: float, plot_path=None, write: bool = False,
                         device=None, progress: bool = False, fallback: tuple[str, float] | None = None,
                         also: tuple[str, float] | None = None, policy_out=None) -> dict:
    """Choose thresholds for a checkpoint on its validation split; with ``write`` make them its exit policy
    (``exit_policy.json``; the previous policy is kept in its history). The result says what changed:
    ``previous_thresholds`` (None if the checkpoint had no policy) and ``written``.

    ``fallback`` = (target, value), or a list of them tried in order, is used instead when a valid ``target``
    cannot be met (an accuracy floor above every threshold's accuracy), on the same validation pass; an entry
    (target, value, min_edge) also counts as unmet when its point decides less than ``min_edge`` of the samples
    at the edge. The result names the target that was used. An invalid target or value still raises.
    ``also`` = (target, value) is chosen on the same validation pass and
    returned, never written, under the result's key "also" (same keys as the result).
    ``policy_out``: write the chosen policy to this file instead (``policy.write_policy_file``; the checkpoint's
    own policy stays), for ``--policy FILE``.
    """
    from ..model import checkpoint as ck
    from ..model.energy import energy_report
    from ..model.policy import ExitPolicy
    from .stats import collect_exit_stats

    model, meta = ck.load_model(path)
    if device:
        model = model.to(device)
    val = validation_split(path, ds)
    stats = collect_exit_stats(model, val, device=device, progress=progress)
    report = energy_report(model.cfg)
    old = meta.get("policy")
    temps = old.temperatures if old is not None else ()
    points = sweep(stats, report, temperatures=temps or None)
    target, value, best = choose_in_order(points, [(target, value), *_as_chain(fallback)], stats.cloud_accuracy)

    def result_for(target, value, point):
        return {"split": "val", "n": len(val), "target": target, "value": value,
                "cloud_accuracy": stats.cloud_accuracy, **point.to_dict(report)}

    result = result_for(target, value, best)
    result["previous_thresholds"] = list(old.thresholds) if old is not None else None
    result["written"] = bool(write)
    if plot_path:
        plot(points, best, report, stats.cloud_accuracy, plot_path)
    chosen = {"method": "target", "split": "val", "n": len(val), "target": target, "value": value,
              "data_checksum": ds.content, "val_images": len(val),
              "exit_fraction": list(best.exit_fraction)}  # per exit, on val: the audit's drift reference
    _keep(path, ExitPolicy(best.thresholds, temps, chosen, None), write, policy_out, result)
    if also:
        result["also"] = result_for(*also, choose(points, *also, stats.cloud_accuracy))
    return result


def _keep(path, policy, write: bool, policy_out, result: dict) -> None:
    """The chosen policy becomes the checkpoint's (``write``) or goes to its own file (``policy_out``)."""
    from ..model import checkpoint as ck
    from ..model.policy import write_policy, write_policy_file

    if write:
        write_policy(path, policy)
    if policy_out:
        write_policy_file(policy_out, policy, path, ck.fingerprint(path))
    result["policy_out"] = str(policy_out) if policy_out else None


def calibrate_risk(path, ds, eps: float, delta: float, kind: str = "disagreement", form: str = "conditional",
                   temperature: bool = False, write: bool = False, device=None, progress: bool = False,
                   policy_out=None) -> dict:
    """Thresholds (and, with ``temperature``, per-exit temperatures) certified by Learn then Test on the
    validation split (``risk.ltt_policy``: risk <= eps with probability >= 1 - delta); with ``write`` they become
    the checkpoint's exit policy, guarantee included. Same result keys as ``calibrate_checkpoint`` plus
    ``temperatures`` and ``guarantee``."""
    from ..model import checkpoint as ck
    from ..model.energy import energy_report
    from .risk import ltt_policy
    from .stats import collect_exit_stats

    model, meta = ck.load_model(path)
    if device:
        model = model.to(device)
    val = validation_split(path, ds)
    stats = collect_exit_stats(model, val, device=device, progress=progress)
    policy, _ = ltt_policy(stats, eps, delta, kind, form, temperature)
    policy = type(policy)(policy.thresholds, policy.temperatures, {**policy.chosen_by, "data_checksum": ds.content},
                          policy.guarantee)
    report = energy_report(model.cfg)
    preds, decided = stats.simulate(policy.thresholds, policy.temperatures or None)
    fr = [int((decided == j).sum()) / len(val) for j in range(len(policy.thresholds))]
    point = OperatingPoint(policy.thresholds, stats.accuracy(preds), fr, report.expected_uj(fr))
    old = meta.get("policy")
    result = {"split": "val", "n": len(val), "target": f"{kind}_risk", "value": eps,
              "cloud_accuracy": stats.cloud_accuracy, **point.to_dict(report),
              "temperatures": list(policy.temperatures), "guarantee": policy.guarantee,
              "previous_thresholds": list(old.thresholds) if old is not None else None, "written": bool(write)}
    _keep(path, policy, write, policy_out, result)
    return result
