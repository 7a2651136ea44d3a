"""Design-space exploration as one command: a sweep file names a grid of hybrid networks; every grid point is
trained, calibrated on the validation split, evaluated once on the test split and recorded as result rows.

A sweep file (``sweeps/*.toml``) names the dataset, the recipe (``recipes/*.toml``, one for every point so the
points are comparable; its network options, such as ReActNet's ``act_shift`` and ``rprelu``, apply to every point,
``exit_pool`` being a grid axis), the initial and teacher checkpoints, the FP32 reference checkpoint, the calibration target
and the grid: one or more ``[[grid]]`` tables, each a product of ``edge_layers`` x ``edge_bits`` x ``exits`` x
``mode`` x ``exit_pool`` (an exits entry is a list of positions, ``"edge"`` for one exit at the end of the edge, or
``"none"``). Relative paths are relative to the working directory (the project root), as for every command.

Every point lives in ``<runs>/<point>/``: ``checkpoint/`` (the training run, resumed from its last epoch when it
was interrupted), ``train.log`` (that point's training output) and ``calibration.png``. A finished point gives
rows (``calibrated``: thresholds chosen on validation; ``paper threshold``: the paper's fixed threshold;
``without exit``: the final classifier alone, with the energy of the network without its exit heads), upserted by
key into the results store (a JSON list, written atomically under a lock file beside it), so a rerun of the same
command skips finished points and the store never holds a point twice. Several sweep processes may share a run
folder and store (say two terminals, each with its own ``--only``, or the same command started twice): a process
holds a point's lock file (``<point>/.lock``, released when the process ends, killed or not) while it trains and
evaluates that point, and another process finding the point locked leaves it (state ``running``). A resumed
sweep starts its interrupted points first, the furthest along first, then the new ones in the file's order.

Points run in local worker processes (``workers``; CPU threads divided between them) or as Ray tasks on an
existing cluster (``ray_address``), each task asking for its CPUs and, on CUDA, one GPU; the driver gathers the
rows. A point may adopt a training run made outside the sweep (``[adopt]``) when that run's network and training
configs are exactly the point's: the finished run is copied into the point's folder (the source is only read).

With ``keep`` (a path pattern with ``{name}``, e.g. ``checkpoints/c10-r32-{name}``) a finished point's checkpoint
(weights, configs, exit policy and logs; not the resumable training state) is copied there and its rows cite the
copy, so the rows never cite the ignored run folder; a rerun keeps points finished before ``keep`` was set.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, HybridExitError, SweepError, need

KINDS = ("calibrated", "paper threshold", "without exit")
ARITHMETIC = "ieee fp32"  # what rows are evaluated in (CUDA's TF32 default is turned off: hybridexit.device)
SPEC_KEYS = {"name", "description", "dataset", "recipe", "init", "teacher", "reference", "depth", "paper_threshold",
             "separate_exit_epochs", "results", "runs", "calibrate", "grid", "adopt", "keep"}
GRID_KEYS = {"edge_layers", "edge_bits", "exits", "mode", "exit_pool", "backbone"}


@dataclass(frozen=True)
class DesignPoint:
    edge_layers: int
    edge_bits: int
    exits: tuple[int, ...]
    mode: str = "joint"
    exit_pool: str = "k3"
    backbone: str = ""  # a name of model.backbones; "" = the CIFAR ResNet of the sweep's depth (edge_layers: layers)

    @property
    def name(self) -> str:
        x = "x" + "_".join(map(str, self.exits)) if self.exits else "noexit"
        net = f"{self.backbone}-" if self.backbone else ""  # names (and run folders) of CIFAR points unchanged
        return f"{net}e{self.edge_layers}-b{self.edge_bits}-{x}-{self.mode}-{self.exit_pool}"

    def to_dict(self) -> dict:
        d = dict(asdict(self), exits=list(self.exits))
        if not self.backbone:
            del d["backbone"]
        return d


@dataclass(frozen=True)
class Calibration:
    """The calibration target: ``value``, or the reference checkpoint's validation accuracy minus
    ``below_reference`` (for ``min_accuracy``); ``fallback`` when no threshold reaches it."""

    target: str
    value: float | None = None
    below_reference: float | None = None
    fallback: tuple[str, float] | None = None

    def resolve(self, reference_val: float | None) -> tuple[str, float]:
        if self.below_reference is None:
            return self.target, float(self.value)
        return self.target, float(reference_val) - self.below_reference


@dataclass(frozen=True)
class SweepSpec:
    path: str
    name: str
    dataset: str
    recipe: str
    train: dict  # TrainConfig fields: the recipe's, with init/teacher from the sweep file
    depth: int
    paper_threshold: float
    calibrate: Calibration
    points: tuple[DesignPoint, ...]
    reference: str | None
    adopt: dict
    separate_exit_epochs: int | None
    results: str | None
    runs: str | None
    description: str = ""
    keep: str | None = None
    network: tuple = ()  # the recipe's network options (HybridConfig fields, as (key, value) pairs), every point's

    def net_config(self, point: DesignPoint):
        from ..data.datasets import DATASETS
        from ..model.resnet import HybridConfig

        d = DATASETS[self.dataset]
        net = {"backbone": point.backbone} if point.backbone else {"depth": self.depth}
        return HybridConfig(**net, num_classes=d["num_classes"], edge_layers=point.edge_layers,
                            edge_bits=point.edge_bits, exits=point.exits, exit_pool=point.exit_pool,
                            mean=d["mean"], std=d["std"], **self._options(point.edge_bits))

    def _options(self, edge_bits: int) -> dict:
        """The recipe's network options for a point: ``ste`` (ApproxSign, a sign's gradient) on binary points only,
        k-bit points keeping the clipped estimator, the one they have."""
        return {k: v for k, v in self.network if k != "ste" or edge_bits == 1}

    def train_config(self, point: DesignPoint, epochs: int | None = None):
        """The recipe with the point's mode (and, in separate mode, the sweep's exit epochs); ``epochs`` overrides."""
        from .train import TrainConfig

        kw = dict(self.train, mode=point.mode)
        if epochs is not None:
            kw["epochs"] = epochs
        if point.mode == "separate" and point.exits and self.separate_exit_epochs is not None:
            kw["exit_epochs"] = self.separate_exit_epochs
        return TrainConfig(**kw)


def _grid_points(table: dict, where: str) -> list[DesignPoint]:
    unknown = sorted(set(table) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(GRID_KEYS)}")
    missing = [k for k in ("edge_layers", "edge_bits", "exits") if k not in table]
    if missing:
        raise ConfigError(f"{where}: give {', '.join(missing)}")
    axes = [table[k] if isinstance(table[k], list) else [table[k]] for k in ("edge_layers", "edge_bits", "exits")]
    modes, pools = table.get("mode", ["joint"]), table.get("exit_pool", ["k3"])
    nets = table.get("backbone", [""])  # edge_layers and exits count each backbone's units (CIFAR: layers, else blocks)
    points = []
    for layers, bits, exits, mode, pool, net in itertools.product(
            *axes, modes if isinstance(modes, list) else [modes], pools if isinstance(pools, list) else [pools],
            nets if isinstance(nets, list) else [nets]):
        if exits == "edge":
            exits = [layers]
        elif exits == "none":
            exits = []
        if not isinstance(exits, list):
            raise ConfigError(f"{where}: exits entries are lists of positions, \"edge\" or \"none\", got {exits!r}")
        points.append(DesignPoint(int(layers), int(bits), tuple(int(e) for e in exits), str(mode), str(pool), str(net)))
    return points


def _calibration(table: dict, path, has_reference: bool) -> Calibration:
    from ..calibration.calibrate import TARGETS

    unknown = sorted(set(table) - {"target", "value", "below_reference", "fallback"})
    if unknown or table.get("target") not in TARGETS:
        raise ConfigError(f"sweep {path}: [calibrate] needs target (one of {', '.join(TARGETS)}) and value or "
                          f"below_reference, and may give fallback = [target, value]")
    if ("value" in table) == ("below_reference" in table):
        raise ConfigError(f"sweep {path}: [calibrate] gives exactly one of value and below_reference")
    if "below_reference" in table and (table["target"] != "min_accuracy" or not has_reference):
        raise ConfigError(f"sweep {path}: below_reference sets a min_accuracy floor under the reference "
                          f"checkpoint's validation accuracy: it needs target = \"min_accuracy\" and reference")
    fb = table.get("fallback")
    if fb is not None and (not isinstance(fb, list) or len(fb) != 2 or fb[0] not in TARGETS):
        raise ConfigError(f"sweep {path}: fallback = [target, value], target one of {', '.join(TARGETS)}")
    return Calibration(table["target"], table.get("value"), table.get("below_reference"),
                       (fb[0], float(fb[1])) if fb else None)


def load_sweep(path) -> SweepSpec:
    """Read and validate a sweep file: every grid point's network and training config is built once here."""
    from ..data.datasets import DATASETS
    from .recipes import read_recipe, read_toml

    path = Path(path)
    d = read_toml(path, "sweep file", "sweeps/paper-cifar10.toml")
    unknown = sorted(set(d) - SPEC_KEYS)
    missing = [k for k in ("dataset", "recipe", "paper_threshold", "calibrate", "grid") if k not in d]
    if unknown or missing:
        raise ConfigError(f"sweep {path}: {'unknown keys ' + str(unknown) if unknown else 'missing ' + str(missing)}; "
                          f"known: {sorted(SPEC_KEYS)}")
    if d["dataset"] not in DATASETS:
        raise ConfigError(f"sweep {path}: dataset {d['dataset']!r}: use one of {', '.join(DATASETS)}")
    train, network = read_recipe(d["recipe"])
    if "exit_pool" in network:
        raise ConfigError(f"sweep {path}: recipe {d['recipe']} sets exit_pool, which is an axis of the sweep's grid: "
                          f"drop it from the recipe and give exit_pool = [...] in the [[grid]] tables")
    train.update({k: d[k] for k in ("init", "teacher") if k in d})
    grid = d["grid"] if isinstance(d["grid"], list) else [d["grid"]]
    points = list(dict.fromkeys(p for i, g in enumerate(grid) for p in _grid_points(g, f"sweep {path}: grid {i + 1}")))
    spec = SweepSpec(str(path), d.get("name", path.stem), d["dataset"], d["recipe"], train, int(d.get("depth", 32)),
                     float(d["paper_threshold"]), _calibration(d["calibrate"], path, "reference" in d),
                     tuple(points), d.get("reference"), dict(d.get("adopt", {})), d.get("separate_exit_epochs"),
                     d.get("results"), d.get("runs"), d.get("description", ""), d.get("keep"),
                     tuple(sorted(network.items())))
    if spec.keep is not None and "{name}" not in spec.keep:
        raise ConfigError(f"sweep {path}: keep = {spec.keep!r} must contain {{name}} (each point its own folder)")
    names = {p.name for p in points}
    if set(spec.adopt) - names:
        raise ConfigError(f"sweep {path}: [adopt] names points not in the grid: {sorted(set(spec.adopt) - names)}")
    for p in points:
        spec.net_config(p)
        spec.train_config(p)
    return spec


# ---- the results store --------------------------------------------------------------------------------------


def row_key(row: dict) -> str:
    return f"{row['name']}|{row['point']}"


def read_rows(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"results store {path}: invalid JSON ({e})") from None
    if not isinstance(rows, list):
        raise SweepError(f"results store {path}: a JSON list of rows expected")
    return rows


def _store_lock(path: Path):
    from filelock import FileLock

    return FileLock(path.with_name(path.name + ".lock"))


def upsert_rows(path, new_rows: list[dict]) -> None:
    """Replace the rows with the same key (point name and kind) and add the others; atomic (temp file + rename)
    and locked (read, merge and write under the store's lock file), so sweeps sharing a store never lose a row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _store_lock(path):
        _upsert_locked(path, new_rows)


def _upsert_locked(path: Path, new_rows: list[dict]) -> None:
    rows = {row_key(r): r for r in read_rows(path)}
    rows.update({row_key(r): r for r in new_rows})
    order = {k: i for i, k in enumerate(("reference",) + KINDS)}
    ordered = sorted(rows.values(), key=lambda r: (r["name"] != "fp32", r["name"], order.get(r["point"], 9)))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ordered, indent=1) + "\n")
    os.replace(tmp, path)


# ---- the state of a point -----------------------------------------------------------------------------------


def _read_json(path) -> dict | None:
    """A JSON file that another process may be replacing right now: None while it is absent or half written.
    (Never ``checkpoint.read_config``: its recovery step could move a directory another run is swapping.)"""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _adopt_state(src, net_cfg, tcfg) -> tuple[str, str]:
    """("absent" | "waiting" | "ready", detail) of an adopted run; a run with another config is refused."""
    from ..model.checkpoint import network_config
    from .train import TrainConfig

    if not Path(src).exists():
        return "absent", f"{src} does not exist: the point trains itself"
    meta = _read_json(Path(src) / "config.json")
    if meta is None:
        return "waiting", f"adopted run {src} has no finished epoch yet"
    theirs_net, theirs_train = network_config(meta), TrainConfig.from_dict(meta["train"]).to_dict()
    if theirs_net != net_cfg or theirs_train != tcfg.to_dict():
        diff = sorted(k for k in theirs_train if theirs_train[k] != tcfg.to_dict().get(k))
        raise SweepError(f"cannot adopt {src}: its {'network' if theirs_net != net_cfg else 'training'} config "
                         f"differs from the point's{' (' + ', '.join(diff) + ')' if diff else ''}")
    if meta["epochs_done"] < tcfg.total_epochs:
        return "waiting", f"adopted run {src} at {meta['epochs_done']}/{tcfg.total_epochs} epochs"
    return "ready", f"adopts finished run {src}"


def _rows_done(rows: dict, point: DesignPoint, tcfg) -> bool:
    from .train import TrainConfig

    kinds = KINDS if point.exits else ("without exit",)
    found = [rows.get(f"{point.name}|{k}") for k in kinds]
    return all(r is not None and TrainConfig.from_dict(r["train"]).to_dict() == tcfg.to_dict() for r in found)


def _point_lock(point_dir: Path):
    from filelock import FileLock

    return FileLock(Path(point_dir) / ".lock")


def _locked_elsewhere(point_dir: Path) -> bool:
    """Whether another process holds the point's lock now (a point folder not made yet is free)."""
    from filelock import Timeout

    if not Path(point_dir).is_dir():
        return False
    try:
        with _point_lock(point_dir).acquire(timeout=0):
            return False
    except Timeout:
        return True


def point_state(spec: SweepSpec, point: DesignPoint, rows: dict, run_dir: Path, epochs: int | None) -> tuple[str, str]:
    """("done" | "running" | "new" | "partial" | "trained" | "waiting" | "adopt", detail) of one grid point."""
    tcfg = spec.train_config(point, epochs)
    if _rows_done(rows, point, tcfg):
        return "done", "rows in the store"
    if _locked_elsewhere(run_dir / point.name):
        return "running", "in another sweep process (its lock is held); this one leaves it"
    meta = _read_json(run_dir / point.name / "checkpoint" / "config.json")
    if meta is not None:
        n = meta.get("epochs_done", 0)
        if n >= tcfg.total_epochs:
            return "trained", "to calibrate and evaluate"
        return "partial", f"{n}/{tcfg.total_epochs} epochs"
    src = spec.adopt.get(point.name) if epochs is None else None
    if src:
        state, detail = _adopt_state(src, spec.net_config(point), tcfg)
        if state != "absent":
            return ("adopt" if state == "ready" else "waiting"), detail
        return "new", f"{tcfg.total_epochs} epochs to train ({detail})"
    return "new", f"{tcfg.total_epochs} epochs to train"


# ---- one point (runs in a worker process or a Ray task) -----------------------------------------------------


def _device(device):
    from ..device import pick_device  # torch is imported where points run, not by the driver at start

    return pick_device(device or None)


def _relative(path: Path) -> str:
    """A path as the rows record it: relative to the project root when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _summary_fields(s: dict) -> dict:
    keys = ("n", "thresholds", "accuracy", "cloud_accuracy", "exit_fraction", "edge_fraction", "edge_uj",
            "cloud_uj", "expected_uj", "fp32_uj", "reduction")
    return {k: s[k] for k in keys}


def _without_exit_row(base: dict, cfg, accuracy: float, n: int, trained_without: bool) -> dict:
    """The network without its exit heads: the final classifier's accuracy, edge and cloud energy without exits."""
    from ..model.energy import energy_report

    rep = energy_report(cfg.replace(exits=()))
    total = rep.edge_uj + rep.cloud_uj
    return dict(base, point="without exit", n=n, thresholds=[], accuracy=accuracy, cloud_accuracy=accuracy,
                exit_fraction=[], edge_fraction=0.0, edge_uj=rep.edge_uj, cloud_uj=rep.cloud_uj, expected_uj=total,
                fp32_uj=rep.fp32_uj, reduction=rep.fp32_uj / total,
                without_exit="trained without exits" if trained_without else "exits off")


def point_rows(spec: SweepSpec, point: DesignPoint, tcfg, ck_dir: Path, ds, device, reference_val, adopted,
               plot_path: Path | None = None, epochs: int | None = None) -> list[dict]:
    """Calibrate on validation (thresholds written as the checkpoint's exit policy), evaluate on test. Rows record
    where they were evaluated and in what arithmetic (IEEE FP32 everywhere: hybridexit.device)."""
    from ..calibration.calibrate import calibrate_checkpoint
    from ..model.checkpoint import load_model
    from .evaluate import evaluate_checkpoint_summary

    model, meta = load_model(ck_dir)
    model = model.to(device)
    base = {"name": point.name, "point": None, "sweep": spec.name, "dataset": spec.dataset, **point.to_dict(),
            "checkpoint": _relative(ck_dir), "recipe": spec.recipe, "epochs": tcfg.total_epochs,
            "train_minutes": round(meta["train_wall_s"] / 60, 1), "device": meta.get("device"),
            "train": tcfg.to_dict(), "adopted_from": adopted, "eval_device": device.type, "arithmetic": ARITHMETIC}
    rows = []
    if point.exits:
        target, value = spec.calibrate.resolve(reference_val)
        cal = calibrate_checkpoint(ck_dir, ds, target, value, plot_path=plot_path or ck_dir.parent / "calibration.png",
                                   write=True, device=device, fallback=spec.calibrate.fallback)
        s_cal, _ = evaluate_checkpoint_summary(model, ds.test, cal["thresholds"], device=device)
        s_pap, _ = evaluate_checkpoint_summary(model, ds.test, [spec.paper_threshold] * len(point.exits), device=device)
        val = {k: cal[k] for k in ("split", "n", "target", "value", "accuracy", "cloud_accuracy", "exit_fraction",
                                   "edge_fraction", "expected_uj", "reduction")}
        rows.append(dict(base, point="calibrated", **_summary_fields(s_cal), calibration=val))
        rows.append(dict(base, point="paper threshold", **_summary_fields(s_pap), calibration=None))
        final_acc, n = s_cal["cloud_accuracy"], s_cal["n"]
    else:
        s, _ = evaluate_checkpoint_summary(model, ds.test, [], device=device)
        final_acc, n = s["accuracy"], s["n"]
    rows.append(_without_exit_row(base, model.cfg, final_acc, n, point.mode == "separate" or not point.exits))
    return _kept(spec, point, ck_dir, rows, epochs)


def keep_checkpoint(ck_dir: Path, dest: Path) -> Path:
    """Copy a finished checkpoint to ``dest`` (replacing it; atomic rename) without its resumable training state."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ck_dir, tmp, ignore=shutil.ignore_patterns("train_state*"))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def keep_path(spec: SweepSpec, point: DesignPoint, epochs: int | None = None) -> Path:
    """Where a finished point's checkpoint is kept; a schedule override (``epochs``) keeps its own copy, as it has
    its own run folder and store, so it never replaces the checkpoint the default schedule's rows cite."""
    return Path(spec.keep.format(name=point.name + ("" if epochs is None else f"-ep{epochs}")))


def _kept(spec: SweepSpec, point: DesignPoint, ck_dir: Path, rows: list[dict], epochs: int | None = None) -> list[dict]:
    """The point's rows citing its kept copy (made now) when the sweep keeps checkpoints; else unchanged."""
    if not spec.keep:
        return rows
    dest = keep_path(spec, point, epochs)
    if dest.resolve() == Path(ck_dir).resolve():  # re-evaluated in place: already the kept copy
        return rows
    kept = _relative(keep_checkpoint(ck_dir, dest))
    return [dict(r, checkpoint=kept) for r in rows]


def _keep_finished(spec: SweepSpec, states, rows: dict, run_dir: Path, epochs: int | None) -> list[dict]:
    """Rows of finished points that still cite their run folder, re-pointed at a kept copy (made now)."""
    out = []
    for p, state, _ in states:
        mine = [r for r in rows.values() if r["name"] == p.name and r.get("sweep") == spec.name]
        ck_dir = run_dir / p.name / "checkpoint"
        if state == "done" and (ck_dir / "config.json").exists() and any(
                r.get("checkpoint") == _relative(ck_dir) for r in mine):
            out += _kept(spec, p, ck_dir, mine, epochs)  # a point's rows all cite the one checkpoint
    return out


def _record_val_split(ck_dir: Path, ds) -> None:
    """A run written before checkpoints recorded their validation images by content: record, in the copy, the
    images its positional split held out (``val_size``, ``split_seed``), as training resumed from it would."""
    from ..data.datasets import get_split, image_ids
    from ..model import checkpoint as ck

    if (ck_dir / ck.VAL_FILE).exists():
        return
    data = ck.read_config(ck_dir)["data"]
    val = get_split(ds, "val", data.get("val_size", 5000), data.get("split_seed", 0))
    ck.write_checkpoint(ck_dir, {}, {ck.VAL_FILE: {"val_ids": image_ids(val.images, val.labels)}})


def _train_or_resume(spec, point, tcfg, ck_dir: Path, ds, task) -> str | None:
    """Adopt, resume or start the point's training run; returns the adopted source, if any."""
    from .train import train

    src = task.get("adopt")
    if src and not (ck_dir / "config.json").exists():
        state, detail = _adopt_state(src, spec.net_config(point), tcfg)
        if state == "waiting":
            raise SweepError(f"{point.name}: {detail}")
        if state == "ready":
            tmp = ck_dir.with_name(ck_dir.name + ".adopt")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.tmp", "*.old"))
            os.replace(tmp, ck_dir)
            _record_val_split(ck_dir, ds)
            print(f"adopted the finished run {src} (copied into {ck_dir})", flush=True)
            return src
    done = (_read_json(ck_dir / "config.json") or {}).get("epochs_done", 0)
    if done < tcfg.total_epochs:
        print(f"{point.name}: training epochs {done + 1}..{tcfg.total_epochs} on {task['device'] or 'default device'}",
              flush=True)
        train(ck_dir, spec.net_config(point), tcfg, ds, resume=(ck_dir / "config.json").exists(),
              device=task["device"], progress=True, stop_after_epochs=task["stop_after_epochs"],
              deadline=task.get("deadline"))
    return None


def _point_of(task: dict) -> DesignPoint:
    return DesignPoint(**dict(task["point"], exits=tuple(task["point"]["exits"])))


def _run_point(task: dict) -> dict:
    from ..data.datasets import load_cifar

    spec = load_sweep(task["spec"])
    point = _point_of(task)
    tcfg = spec.train_config(point, task["epochs"])
    ck_dir = Path(task["point_dir"]) / "checkpoint"
    ds = load_cifar(spec.dataset, task["data_dir"])
    if task.get("reevaluate"):  # a finished point: calibrate and evaluate again the checkpoint its rows cite
        ck_dir = Path(task["reevaluate"])
        print(f"{point.name}: re-evaluating {ck_dir} (no training)", flush=True)
        rows = point_rows(spec, point, tcfg, ck_dir, ds, _device(task["device"]), task["reference_val"],
                          task.get("adopted"), plot_path=Path(task["point_dir"]) / "calibration.png",
                          epochs=task["epochs"])
        return {"name": point.name, "status": "done", "rows": rows}
    adopted = _train_or_resume(spec, point, tcfg, ck_dir, ds, task)
    done = (_read_json(ck_dir / "config.json") or {}).get("epochs_done", 0)
    if done < tcfg.total_epochs:
        return {"name": point.name, "status": "partial", "detail": f"{done}/{tcfg.total_epochs} epochs"}
    if task.get("train_only"):  # calibration and the test evaluation happen where the test split is
        return {"name": point.name, "status": "trained", "detail": f"{done} epochs, not evaluated (train only)"}
    adopted = adopted or (_read_json(Path(task["point_dir"]) / "adopted.json") or {}).get("source")
    if adopted:
        (Path(task["point_dir"]) / "adopted.json").write_text(json.dumps({"source": adopted}) + "\n")
    rows = point_rows(spec, point, tcfg, ck_dir, ds, _device(task["device"]), task["reference_val"], adopted,
                      epochs=task["epochs"])
    return {"name": point.name, "status": "done", "rows": rows}


def run_point(task: dict) -> dict:
    """One grid point, start to rows; its output goes to ``<point dir>/train.log``. Never raises: a failure
    comes back as ``{"status": "failed", "error": ...}`` (the traceback is in the log)."""
    import torch

    os.chdir(task["root"])
    torch.set_num_threads(task["threads"])
    if task.get("gpu_share") and str(task["device"] or "").startswith("cuda"):  # workers sharing one GPU
        torch.cuda.set_per_process_memory_fraction(task["gpu_share"], torch.device(task["device"]))
    from filelock import Timeout

    pdir = Path(task["point_dir"])
    pdir.mkdir(parents=True, exist_ok=True)
    try:
        lock = _point_lock(pdir).acquire(timeout=0)
    except Timeout:  # another sweep process took the point after this one looked
        return {"name": _point_of(task).name, "status": "running",
                "detail": "in another sweep process (its lock is held); this one left it"}
    with lock, open(pdir / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}, {task['threads']} threads", flush=True)
        try:
            return _run_point(task)
        except Exception as e:  # noqa: BLE001 - reported to the driver, which goes on with the other points
            traceback.print_exc()
            err = str(e) if isinstance(e, HybridExitError) else f"{type(e).__name__}: {e} (see {pdir / 'train.log'})"
            return {"name": _point_of(task).name, "status": "failed", "error": err}


# ---- the driver ---------------------------------------------------------------------------------------------


def reference_row(spec: SweepSpec, ds, device, rows: dict) -> dict:
    """The FP32 reference checkpoint on validation (the calibration floor) and test (Fig. 4's reference point);
    reused from the store while the checkpoint's weights are unchanged."""
    from ..calibration.calibrate import validation_split
    from ..calibration.stats import collect_exit_stats
    from ..model.checkpoint import fingerprint, load_model
    from .evaluate import evaluate_checkpoint_summary

    fp = fingerprint(spec.reference)
    old = rows.get("fp32|reference")
    if old and old.get("fingerprint") == fp and old.get("checkpoint") == spec.reference:
        return old
    model, meta = load_model(spec.reference)
    model = model.to(device)
    val_acc = collect_exit_stats(model, validation_split(spec.reference, ds), device=device).cloud_accuracy
    s, _ = evaluate_checkpoint_summary(model, ds.test, [], device=device)
    return {"name": "fp32", "point": "reference", "sweep": spec.name, "dataset": spec.dataset, "edge_layers": 0,
            "edge_bits": 32, "exits": [], "mode": "float", "exit_pool": None, **_summary_fields(s),
            "val_accuracy": val_acc, "checkpoint": spec.reference, "fingerprint": fp, "recipe": None,
            "epochs": meta.get("epochs_done"), "train_minutes": round(meta.get("train_wall_s", 0) / 60, 1),
            "device": meta.get("device"), "train": meta.get("train"), "eval_device": device.type,
            "arithmetic": ARITHMETIC}


class _Progress:
    """One bar over every epoch left in the sweep (ETA from its rate), the points in training beside it; polled
    from the points' training state files, which every epoch rewrites (on a cluster: where the folder is shared)."""

    def __init__(self, tasks: list[dict], name: str, enabled: bool):
        from tqdm import tqdm

        self.tasks, self.finished, self.write = tasks, set(), tqdm.write
        total = sum(t["total_epochs"] - t["start_epoch"] for t in tasks)
        self.bar = tqdm(total=total, unit="epoch", desc=f"sweep {name}", disable=not enabled, dynamic_ncols=True)
        self.enabled = enabled

    def poll(self) -> None:
        done, active = 0, []
        for t in self.tasks:
            st = _read_json(Path(t["point_dir"]) / "checkpoint" / "train_state.json") or {}
            e = min(max(st.get("epoch", 0), t["start_epoch"]), t["total_epochs"])
            done += e - t["start_epoch"]
            if t["name"] not in self.finished and st:
                active.append(f"{t['name']} {e}/{t['total_epochs']}" if e < t["total_epochs"] else f"{t['name']} eval")
        self.bar.n = done
        self.bar.set_postfix_str(", ".join(active[:4]), refresh=False)
        self.bar.refresh()

    def finish(self, res: dict) -> None:
        self.finished.add(res["name"])
        if not self.enabled:
            return
        if res["status"] == "done":
            r = next(r for r in res["rows"] if r["point"] in ("calibrated", "without exit"))
            self.write(f"{res['name']}: done, {r['point']} accuracy {r['accuracy']:.4f}, "
                       f"edge {r['edge_fraction']:.1%}, {r['reduction']:.2f}x less energy than FP32")
        else:
            self.write(f"{res['name']}: {res['status']}, {res.get('detail') or res.get('error')}")
        self.poll()

    def close(self) -> None:
        self.bar.close()


def _inline(tasks: list[dict], poll):
    """One worker: the points one after another in this process (no start-up cost), the bar polled from a thread."""
    import threading

    stop = threading.Event()
    watcher = threading.Thread(target=lambda: [poll() for _ in iter(lambda: stop.wait(2.0), True)], daemon=True)
    watcher.start()
    try:
        for t in tasks:
            yield run_point(t)
    finally:
        stop.set()
        watcher.join()


def _local(tasks: list[dict], workers: int, poll):
    """Points in ``workers`` worker processes (spawned: each imports torch afresh, with its own thread count)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ex = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = {ex.submit(run_point, t) for t in tasks}
        while pending:
            done, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
            for f in done:
                try:
                    yield f.result()
                except BrokenProcessPool:
                    raise SweepError("a worker process died (killed or out of memory); finished points are in the "
                                     "store: run the same command again to resume the others") from None
            poll()
    except BaseException:
        # stop the points in flight now (their last finished epoch is on disk); Python < 3.14 has no public call
        for proc in list((getattr(ex, "_processes", None) or {}).values()):
            proc.terminate()
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown()


def _ray(tasks: list[dict], address: str, poll, gpus: float):
    """Points as Ray tasks (``address``: "auto", "ray://host:port", or "local" to start a runtime here)."""
    ray = need("ray", "--ray")
    if not ray.is_initialized():
        if address == "local":
            ray.init(include_dashboard=False)
        else:
            ray.init(address=address)
    remote = ray.remote(run_point)
    pending = [remote.options(num_cpus=t["threads"], num_gpus=gpus).remote(t) for t in tasks]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            for ref in done:
                yield ray.get(ref)
            poll()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _select(points, only) -> list[DesignPoint]:
    if not only:
        return list(points)
    chosen = [p for p in points if any(fnmatch.fnmatchcase(p.name, pat) for pat in only)]
    if not chosen:
        raise ConfigError(f"--only {' '.join(only)} matches no point; the points: {', '.join(p.name for p in points)}")
    return chosen


def _locations(spec: SweepSpec, epochs, runs, results) -> tuple[Path, Path]:
    """The sweep's run folder and results store; a schedule override (``epochs``) gets its own of both."""
    suffix = f"-ep{epochs}" if epochs is not None else ""
    run_dir = Path(runs or spec.runs or "runs/sweeps") / f"{spec.name}{suffix}"
    default = Path(spec.results or f"results/sweep-{spec.dataset}.json")
    return run_dir, Path(results) if results else default.with_name(f"{default.stem}{suffix}{default.suffix}")


def _reevaluation(spec, point: DesignPoint, rows: dict) -> tuple[str, str | None]:
    """(checkpoint, adopted_from) of a finished point's rows, which must all cite one existing checkpoint."""
    mine = [rows[f"{point.name}|{k}"] for k in (KINDS if point.exits else ("without exit",))]
    cited = {r["checkpoint"] for r in mine}
    if len(cited) != 1 or not (Path(next(iter(cited))) / "config.json").exists():
        raise SweepError(f"{point.name}: its rows cite {', '.join(sorted(cited))}, not one checkpoint that exists "
                         "here: re-evaluate it where that checkpoint is")
    return next(iter(cited)), mine[0].get("adopted_from")


def _tasks(spec, states, run_dir, opts: dict, rows: dict | None = None) -> list[dict]:
    out = []
    for p, state, _ in states:
        if state == "done" and rows is not None:  # --reevaluate
            ck, adopted = _reevaluation(spec, p, rows)
            out.append(dict(opts, name=p.name, point=p.to_dict(), point_dir=str((run_dir / p.name).resolve()),
                            adopt=None, reevaluate=ck, adopted=adopted, total_epochs=0, start_epoch=0))
            continue
        if state not in ("new", "partial", "trained", "adopt") or (state == "trained" and opts.get("train_only")):
            continue
        tcfg = spec.train_config(p, opts["epochs"])
        meta = _read_json(run_dir / p.name / "checkpoint" / "config.json") or {}
        start = tcfg.total_epochs if state == "adopt" else min(meta.get("epochs_done", 0), tcfg.total_epochs)
        out.append(dict(opts, name=p.name, point=p.to_dict(), point_dir=str((run_dir / p.name).resolve()),
                        adopt=spec.adopt.get(p.name) if opts["epochs"] is None else None,
                        total_epochs=tcfg.total_epochs, start_epoch=start))
    # trained and interrupted points first, the furthest along first (rows soonest); new ones in the file's order
    return sorted(out, key=lambda t: -t["start_epoch"] / t["total_epochs"] if t["total_epochs"] else -1.0)


def run_sweep(spec_path, workers: int = 1, ray_address: str | None = None, epochs: int | None = None, device=None,
              data_dir=None, only=None, dry_run: bool = False, runs=None, results=None, threads: int | None = None,
              stop_after_epochs: int | None = None, progress: bool = True, reevaluate: bool = False,
              deadline: float | None = None, train_only: bool = False) -> dict:
    """Run (or resume) a sweep; returns {"sweep", "results", "runs", "points": [{name, state, detail}], "failed"}.

    ``stop_after_epochs`` stops every point after that many more epochs (a time-boxed run; rerun to go on).
    ``deadline`` (a ``time.time()``) stops every point at its last epoch boundary before it (``train.train``).
    ``train_only`` trains the points and leaves them ``trained``, without the reference, calibration or test rows
    (a GPU window without the test split: a later run of the same sweep, anywhere, evaluates them).
    Several workers may share one CUDA device (``device="cuda"``): each gets an equal share of its memory.
    ``reevaluate`` calibrates and evaluates the finished points again from the checkpoint their rows cite, on this
    device (e.g. rows measured before evaluation was IEEE FP32 on CUDA, or after the energy model changed), and
    the FP32 reference with them; the others train as usual."""
    spec = load_sweep(spec_path)
    if workers < 1 or (threads is not None and threads < 1) or (epochs is not None and epochs < 1):
        raise ConfigError("--workers, --threads and --epochs must be at least 1")
    run_dir, store = _locations(spec, epochs, runs, results)
    rows = {row_key(r): r for r in read_rows(store)}
    states = [(p, *point_state(spec, p, rows, run_dir, epochs)) for p in _select(spec.points, only)]
    summary = {"sweep": spec.name, "results": str(store), "runs": str(run_dir), "failed": [],
               "points": [{"name": p.name, "state": s,
                           "detail": "rows in the store, to measure again" if reevaluate and s == "done" else d}
                          for p, s, d in states]}
    kept = _keep_finished(spec, states, rows, run_dir, epochs) if spec.keep and not dry_run else []
    if kept:
        upsert_rows(store, kept)
    pending = [s for _, s, _ in states if s in ("new", "partial", "adopt") or (s == "trained" and not train_only)
               or (reevaluate and s == "done")]
    if dry_run or not (pending or (spec.reference and not train_only and "fp32|reference" not in rows)):
        return summary
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    opts = {"root": os.getcwd(), "spec": str(Path(spec_path).resolve()), "epochs": epochs, "device": device,
            "data_dir": str(Path(data_dir).resolve()) if data_dir else None, "stop_after_epochs": stop_after_epochs,
            "threads": threads or (1 if ray_address else max(1, cpus // workers)), "reference_val": None,
            "deadline": deadline, "train_only": train_only, "gpu_share": round(0.95 / workers, 3) if workers > 1 else None}
    if spec.reference and not train_only:
        from ..data.datasets import load_cifar

        ref = reference_row(spec, load_cifar(spec.dataset, data_dir), _device(device),
                            {k: v for k, v in rows.items() if k != "fp32|reference"} if reevaluate else rows)
        upsert_rows(store, [ref])
        opts["reference_val"] = ref["val_accuracy"]
    tasks = _tasks(spec, states, run_dir, opts, rows if reevaluate else None)
    bar = _Progress(tasks, spec.name, progress)
    gpus = 1 if str(device or "").startswith("cuda") else 0
    outcome = {}
    try:
        runner = (_ray(tasks, ray_address, bar.poll, gpus) if ray_address else
                  _inline(tasks, bar.poll) if workers == 1 else _local(tasks, workers, bar.poll))
        for res in runner:
            if res["status"] == "done":
                upsert_rows(store, res["rows"])
            outcome[res["name"]] = res
            bar.finish(res)
    finally:
        bar.close()
    for entry in summary["points"]:
        res = outcome.get(entry["name"])
        if res:
            entry["state"] = res["status"]
            entry["detail"] = res.get("detail") or res.get("error") or f"{len(res['rows'])} rows written"
    summary["failed"] = [e for e in summary["points"] if e["state"] == "failed"]
    return summary
