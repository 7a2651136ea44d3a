"""The committed results/cifar10.json and results/cifar100.json rows against their checkpoints.

Without data: every row cites a shipped checkpoint, every shipped checkpoint is cited, a calibrated row's thresholds
are the checkpoint's exit policy, and every energy figure is what the energy model gives for the row's network and
measured exit fractions. With CIFAR in data/ (`make data`): each row's figures on the first 100 test images
("slice", written by benchmarks/cifar.py) are re-evaluated from its checkpoint at its thresholds.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from hybridexit.model.checkpoint import load_model
from hybridexit.model.energy import energy_report
from hybridexit.model.policy import read_policy
from hybridexit.model.resnet import HybridConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
DATASETS = ("cifar10", "cifar100")
# what load_cifar reads in data/: the extracted folder or the official archive
SOURCES = {"cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
           "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz")}


def _results(dataset: str) -> dict:
    return json.loads((ROOT / "results" / f"{dataset}.json").read_text())


ROWS = [(ds, p) for ds in DATASETS for p in _results(ds)["points"]]
IDS = [p["name"] for _, p in ROWS]


@functools.cache
def _benchmark():
    spec = importlib.util.spec_from_file_location("cifar_benchmark", ROOT / "benchmarks" / "cifar.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shipped(row: dict) -> bool:
    """checkpoints/ holds what users are pointed at; the others live under runs/ (not in a fresh clone)."""
    return row["checkpoint"].startswith("checkpoints/")


def test_rows_of_unshipped_checkpoints_record_their_weights_and_command():
    for _, p in ROWS:
        if not _shipped(p):
            assert p["checkpoint"].startswith("runs/checkpoints/"), p["checkpoint"]
            assert re.fullmatch(r"[0-9a-f]{64}", p.get("weights_sha256", "")) and p.get("command"), p["name"]


def test_rows_cite_shipped_checkpoints_and_every_shipped_one_is_cited_by_a_result():
    cited = {Path(p["checkpoint"]).name for _, p in ROWS if _shipped(p)}
    shipped = {d.name for d in (ROOT / "checkpoints").iterdir() if (d / "config.json").exists()}
    assert cited <= shipped, f"rows cite missing checkpoints: {cited - shipped}"
    results = "".join(f.read_text() for f in (ROOT / "results").glob("*.json") if not f.name.startswith("history-"))
    uncited = sorted(n for n in shipped if not re.search(rf"checkpoints/{re.escape(n)}(?![\w.-])", results))
    assert not uncited, f"shipped but cited by no results/*.json (intermediate? see results/history-*.json): {uncited}"


@pytest.mark.parametrize("dataset,row", ROWS, ids=IDS)
def test_row_energy_is_the_energy_model_at_its_exit_fractions(dataset, row):
    report = energy_report(HybridConfig.from_dict(row["network"]))
    d = report.to_dict(row["exit_fraction"])
    for key in ("edge_uj", "cloud_uj", "fp32_uj", "expected_uj", "reduction"):
        assert math.isclose(d[key], row[key], rel_tol=1e-9), (key, d[key], row[key])
    assert math.isclose(sum(row["exit_fraction"]), row["edge_fraction"], abs_tol=1e-12)


@pytest.mark.parametrize("dataset,row", [r for r in ROWS if r[1]["point"] == "calibrated" and r[1]["thresholds"]],
                         ids=[p["name"] for _, p in ROWS if p["point"] == "calibrated" and p["thresholds"]])
def test_calibrated_row_thresholds_are_the_checkpoints_policy(dataset, row):
    if not (ROOT / row["checkpoint"]).exists():
        pytest.skip(f"{row['checkpoint']} is not shipped (runs/): the row records its weights' SHA-256")
    policy = read_policy(ROOT / row["checkpoint"])
    assert policy is not None and list(policy.thresholds) == row["thresholds"]


@pytest.fixture(scope="module")
def datasets():
    loaded = {}

    def get(name: str):
        if not any((DATA / s).exists() for s in SOURCES[name]):
            pytest.skip(f"needs the data: no {' or '.join(SOURCES[name])} in {DATA} (make data), so the committed "
                        f"{name} slice figures cannot be re-evaluated here")
        if name not in loaded:
            from hybridexit.data import load_cifar

            loaded[name] = load_cifar(name, DATA)
        ds = loaded[name]
        if ds.checksum != _results(name)["data_checksum"]:
            pytest.skip(f"{DATA} holds another copy of {name} than results/{name}.json was measured on")
        return ds
    return get


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(path: str):
        if path not in cache:
            cache[path] = load_model(ROOT / path)
        return cache[path]
    return get


@pytest.mark.parametrize("dataset,row", ROWS, ids=IDS)
def test_row_slice_matches_reevaluation(dataset, row, datasets, models):
    """The first 100 test images, evaluated now at the row's thresholds, give exactly the committed figures."""
    assert "slice" in row, "row without slice figures: run python benchmarks/cifar.py --slice-only"
    if not (ROOT / row["checkpoint"]).exists():
        pytest.skip(f"{row['checkpoint']} is not shipped (runs/): the row records its weights' SHA-256")
    ds = datasets(dataset)
    bench = _benchmark()
    model, meta = models(row["checkpoint"])
    got = bench.slice_figures(model, ds, row["thresholds"], bench.row_temperatures(row, meta["policy"]))
    assert got == row["slice"]
