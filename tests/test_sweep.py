"""The design-space sweep on the repo's tiny sweep file (sweeps/tiny.toml) and synthetic CIFAR-format data:
end to end, interrupted and resumed, adoption of an outside run, and the Ray path on a real local Ray runtime."""

import json
import warnings
from pathlib import Path

import pytest

from hybridexit import ConfigError
from hybridexit.cli import main
from hybridexit.errors import SweepError
from hybridexit.workflows.sweep import load_sweep, read_rows, run_sweep

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "sweeps" / "tiny.toml"


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # a sweep file's paths are relative to the project root


def sweep(tmp_path, data, spec=TINY, **kw):
    kw.setdefault("progress", False)
    return run_sweep(spec, data_dir=data, runs=tmp_path / "runs", results=tmp_path / "store.json", **kw)


def states(summary):
    return {e["name"]: e["state"] for e in summary["points"]}


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def log_epochs(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "log.jsonl").read_text().splitlines()]


def test_tiny_sweep_end_to_end_then_rerun_does_nothing(tmp_path, tiny_cifar):
    from hybridexit.data import load_cifar
    from hybridexit.model.checkpoint import load_model
    from hybridexit.workflows.evaluate import evaluate_checkpoint_summary

    s = sweep(tmp_path, tiny_cifar, workers=2)
    assert set(states(s).values()) == {"done"} and not s["failed"]
    rows = read_rows(tmp_path / "store.json")
    keys = [(r["name"], r["point"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4 * 3 + 1  # four points with exits (3 rows each), one without (1 row)
    by = {k: r for k, r in zip(keys, rows)}
    cal, pap, off = (by[("e4-b2-x2_4-joint-k3", k)] for k in ("calibrated", "paper threshold", "without exit"))
    assert pap["thresholds"] == [0.5, 0.5] and len(cal["exit_fraction"]) == 2 and cal["calibration"]["split"] == "val"
    assert off["exit_fraction"] == [] and off["accuracy"] == cal["cloud_accuracy"] and off["edge_uj"] < cal["edge_uj"]
    assert off["without_exit"] == "exits off"
    assert by[("e4-b1-x4-separate-k3", "without exit")]["without_exit"] == "trained without exits"
    for r in rows:
        assert r["epochs"] == (3 if r["mode"] == "separate" and r["exits"] else 2) and r["recipe"] == "recipes/sweep-tiny.toml"
        assert r["device"] == "cpu" and r["train_minutes"] >= 0 and r["dataset"] == "cifar10"
    # the calibrated row is what evaluating the checkpoint at its written exit policy gives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    model, meta = load_model(cal["checkpoint"])
    assert list(meta["policy"].thresholds) == cal["thresholds"]
    again, _ = evaluate_checkpoint_summary(model, ds.test, meta["policy"].thresholds)
    assert again["accuracy"] == cal["accuracy"] and again["exit_fraction"] == cal["exit_fraction"]
    assert (tmp_path / "runs/tiny/e4-b2-x2_4-joint-k3/train.log").read_text().count("epoch") >= 2

    before, store = files_of(tmp_path / "runs"), (tmp_path / "store.json").read_bytes()
    s2 = sweep(tmp_path, tiny_cifar, workers=2)
    assert set(states(s2).values()) == {"done"}
    assert files_of(tmp_path / "runs") == before and (tmp_path / "store.json").read_bytes() == store


def test_interrupted_sweep_resumes_without_redoing_finished_points(tmp_path, tiny_cifar):
    only = ["e2-b1-x2-joint-k3", "e4-b1-x4-separate-k3"]
    # time-boxed run: every point stops after one epoch, exactly what a kill after that epoch leaves on disk
    s1 = sweep(tmp_path, tiny_cifar, only=only, stop_after_epochs=1)
    assert states(s1) == {"e2-b1-x2-joint-k3": "partial", "e4-b1-x4-separate-k3": "partial"}
    assert read_rows(tmp_path / "store.json") == []
    run = tmp_path / "runs" / "tiny"
    first_sep = log_epochs(run / "e4-b1-x4-separate-k3/checkpoint")
    first_e2 = log_epochs(run / "e2-b1-x2-joint-k3/checkpoint")
    assert [r["epoch"] for r in first_sep] == [1] and [r["epoch"] for r in first_e2] == [1]

    s2 = sweep(tmp_path, tiny_cifar, only=only[:1])  # finish one point
    assert states(s2) == {"e2-b1-x2-joint-k3": "done"}
    done_files, done_rows = files_of(run / "e2-b1-x2-joint-k3"), read_rows(tmp_path / "store.json")
    assert log_epochs(run / "e2-b1-x2-joint-k3/checkpoint")[0] == first_e2[0]  # resumed, epoch 1 not redone

    assert sweep(tmp_path, tiny_cifar, only=only, dry_run=True)["points"][1]["detail"] == "1/3 epochs"
    s3 = sweep(tmp_path, tiny_cifar, only=only)
    assert states(s3) == {"e2-b1-x2-joint-k3": "done", "e4-b1-x4-separate-k3": "done"}
    assert s3["points"][0]["detail"] == "rows in the store"  # skipped, not rerun
    assert files_of(run / "e2-b1-x2-joint-k3") == done_files
    rows = read_rows(tmp_path / "store.json")
    assert [r for r in rows if r["name"] == "e2-b1-x2-joint-k3"] == done_rows
    sep = log_epochs(run / "e4-b1-x4-separate-k3/checkpoint")
    assert [r["epoch"] for r in sep] == [1, 2, 3] and sep[0] == first_sep[0] and sep[-1]["phase"] == "exits"
    assert "training epochs 2..3" in (run / "e4-b1-x4-separate-k3/train.log").read_text()


def test_keep_copies_finished_checkpoints_and_the_rows_cite_the_copies(tmp_path, tiny_cifar):
    plain, kept_spec = TINY, tmp_path / "keep.toml"
    keep = f'keep = "{tmp_path}/ck/t-{{name}}"\n'
    kept_spec.write_text(TINY.read_text().replace("separate_exit_epochs", keep + "separate_exit_epochs"))
    sweep(tmp_path, tiny_cifar, spec=plain, only=["e2-b1-x2-joint-k3"])  # finished before keep was set
    run_ck = str(tmp_path / "runs/tiny/e2-b1-x2-joint-k3/checkpoint")
    assert {r["checkpoint"] for r in read_rows(tmp_path / "store.json")} == {run_ck}
    s = sweep(tmp_path, tiny_cifar, spec=kept_spec, only=["e2-b1-x2-joint-k3", "e4-b1-noexit-joint-k3"])
    assert states(s) == {"e2-b1-x2-joint-k3": "done", "e4-b1-noexit-joint-k3": "done"}
    rows = read_rows(tmp_path / "store.json")
    assert {r["name"]: r["checkpoint"] for r in rows} == {n: str(tmp_path / f"ck/t-{n}")
                                                          for n in ("e2-b1-x2-joint-k3", "e4-b1-noexit-joint-k3")}
    for n in ("e2-b1-x2-joint-k3", "e4-b1-noexit-joint-k3"):
        ck, run = tmp_path / f"ck/t-{n}", tmp_path / f"runs/tiny/{n}/checkpoint"
        assert (ck / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
        assert not list(ck.glob("train_state*")) and not list(tmp_path.glob("ck/*.tmp"))
    assert (tmp_path / "ck/t-e2-b1-x2-joint-k3/exit_policy.json").exists()
    store = (tmp_path / "store.json").read_bytes()
    sweep(tmp_path, tiny_cifar, spec=kept_spec, only=["e2-b1-x2-joint-k3"])  # nothing left to keep or train
    assert (tmp_path / "store.json").read_bytes() == store
    bad = tmp_path / "bad.toml"
    bad.write_text(kept_spec.read_text().replace("{name}", "x"))
    with pytest.raises(ConfigError, match="must contain"):
        load_sweep(bad)


def _spec_with(tmp_path, extra: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(TINY.read_text().replace('name = "tiny"', 'name = "tiny2"') + extra)
    return p


def test_adopts_a_finished_outside_run_and_reads_the_reference(tmp_path, tiny_cifar):
    from hybridexit.data import load_cifar
    from hybridexit.model.resnet import HybridConfig
    from hybridexit.workflows.sweep import DesignPoint
    from hybridexit.workflows.train import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    spec = load_sweep(TINY)
    point = DesignPoint(4, 1, (4,))
    train(tmp_path / "outside", spec.net_config(point), spec.train_config(point), ds, progress=False)
    fp32 = HybridConfig(depth=8, mean=ds.mean, std=ds.std)
    train(tmp_path / "fp32", fp32, spec.train_config(DesignPoint(0, 32, ())), ds, progress=False)
    outside = files_of(tmp_path / "outside")
    p = _spec_with(tmp_path, f'\n[adopt]\n"e4-b1-x4-joint-k3" = "{tmp_path / "outside"}"\n')
    text = p.read_text().replace('value = 0.05', 'below_reference = 0.05').replace(
        'target = "max_drop"', 'target = "min_accuracy"\nfallback = ["exit_fraction", 0.5]')
    p.write_text(text.replace("separate_exit_epochs", f'reference = "{tmp_path / "fp32"}"\nseparate_exit_epochs'))
    assert states(sweep(tmp_path, tiny_cifar, spec=p, dry_run=True, only=["e4-b1-x4-joint-k3"])) == {
        "e4-b1-x4-joint-k3": "adopt"}
    s = sweep(tmp_path, tiny_cifar, spec=p, only=["e4-b1-x4-joint-k3"])
    assert states(s) == {"e4-b1-x4-joint-k3": "done"}
    rows = {(r["name"], r["point"]): r for r in read_rows(tmp_path / "store.json")}
    ref, cal = rows[("fp32", "reference")], rows[("e4-b1-x4-joint-k3", "calibrated")]
    assert cal["adopted_from"] == str(tmp_path / "outside") and 0 <= ref["val_accuracy"] <= 1
    assert cal["calibration"]["target"] in ("min_accuracy", "exit_fraction")
    if cal["calibration"]["target"] == "min_accuracy":
        assert cal["calibration"]["value"] == pytest.approx(ref["val_accuracy"] - 0.05)
    assert files_of(tmp_path / "outside") == outside  # the source is only read
    assert log_epochs(tmp_path / "runs/tiny2/e4-b1-x4-joint-k3/checkpoint") == log_epochs(tmp_path / "outside")


def test_adoption_refuses_another_recipe_and_waits_for_an_unfinished_run(tmp_path, tiny_cifar):
    from hybridexit.data import load_cifar
    from hybridexit.workflows.sweep import DesignPoint
    from hybridexit.workflows.train import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    spec, point = load_sweep(TINY), DesignPoint(4, 1, (4,))
    train(tmp_path / "part", spec.net_config(point), spec.train_config(point), ds, progress=False, stop_after_epochs=1)
    p = _spec_with(tmp_path, f'\n[adopt]\n"e4-b1-x4-joint-k3" = "{tmp_path / "part"}"\n')
    s = sweep(tmp_path, tiny_cifar, spec=p, only=["e4-b1-x4-joint-k3"])
    assert states(s) == {"e4-b1-x4-joint-k3": "waiting"} and "1/2 epochs" in s["points"][0]["detail"]
    assert not (tmp_path / "runs/tiny2/e4-b1-x4-joint-k3").exists()
    other = spec.train_config(point).__class__(**dict(spec.train_config(point).to_dict(), lr=0.01))
    train(tmp_path / "other", spec.net_config(point), other, ds, progress=False)
    p.write_text(p.read_text().replace(str(tmp_path / "part"), str(tmp_path / "other")))
    with pytest.raises(SweepError, match="cannot adopt .*training config differs .*lr"):
        sweep(tmp_path, tiny_cifar, spec=p, only=["e4-b1-x4-joint-k3"])


def test_bad_sweep_files_are_refused_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    for text, msg in ((TINY.read_text() + "\nworkers = 3\n", "unknown keys"),
                      (TINY.read_text().replace('exits = [[2, 4]]', 'exits = [[2, 6]]'), "exit at layer 6"),
                      (TINY.read_text().replace("value = 0.05", "below_reference = 0.02").replace("max_drop", "min_accuracy"),
                       "needs target .* and reference")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_sweep(bad)
    with pytest.raises(ConfigError, match="matches no point"):
        run_sweep(TINY, only=["e99-*"], dry_run=True, runs=tmp_path, results=tmp_path / "s.json")
    assert main(["sweep", str(TINY), "--dry-run", "--runs", str(tmp_path), "--results", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert out.count(" new ") == 5 and "e4-b2-x2_4-joint-k3" in out
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.toml" in err


def test_epochs_override_gets_its_own_run_folder_and_store(tmp_path):
    s = run_sweep(TINY, epochs=5, dry_run=True, runs=tmp_path)
    assert s["runs"] == str(tmp_path / "tiny-ep5") and s["results"] == "results/sweep-cifar10-ep5.json"
    assert {e["detail"] for e in s["points"] if "separate" not in e["name"]} == {"5 epochs to train"}


def test_ray_runs_the_tiny_sweep_on_a_local_runtime(tmp_path, tiny_cifar):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = sweep(tmp_path, tiny_cifar, ray_address="local", only=["e2-b1-x2-joint-k3", "e4-b1-noexit-joint-k3"])
    finally:
        ray.shutdown()
    assert states(s) == {"e2-b1-x2-joint-k3": "done", "e4-b1-noexit-joint-k3": "done"}
    rows = read_rows(tmp_path / "store.json")
    assert sorted((r["name"], r["point"]) for r in rows) == [
        ("e2-b1-x2-joint-k3", "calibrated"), ("e2-b1-x2-joint-k3", "paper threshold"),
        ("e2-b1-x2-joint-k3", "without exit"), ("e4-b1-noexit-joint-k3", "without exit")]
    assert (tmp_path / "runs/tiny/e2-b1-x2-joint-k3/train.log").stat().st_size > 0


def _upsert_many(store: str, tag: str, n: int, barrier) -> None:
    from hybridexit.workflows.sweep import upsert_rows

    barrier.wait()  # both writers at once (unlocked, this loses rows and crashes a writer on the temp file)
    for i in range(n):
        upsert_rows(store, [{"name": f"{tag}{i}", "point": "calibrated"}])


def test_sweeps_sharing_a_store_never_lose_a_row(tmp_path):
    import multiprocessing

    store = str(tmp_path / "store.json")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_upsert_many, args=(store, tag, 100, barrier)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(read_rows(store)) == 200


def test_a_point_locked_by_another_process_is_left_alone_and_partial_points_go_first(tmp_path, tiny_cifar):
    from hybridexit.workflows.sweep import _point_lock, _tasks, point_state

    only = ["e2-b1-x2-joint-k3", "e4-b1-x4-separate-k3", "e4-b1-noexit-joint-k3"]
    sweep(tmp_path, tiny_cifar, only=only[1:2], stop_after_epochs=1)  # separate: 1 of 3 epochs
    sweep(tmp_path, tiny_cifar, only=only[2:], stop_after_epochs=1)  # no exit: 1 of 2 epochs
    run = tmp_path / "runs" / "tiny"
    spec = load_sweep(TINY)
    points = [p for p in spec.points if p.name in only]
    states_ = [(p, *point_state(spec, p, {}, run, None)) for p in points]
    opts = {"epochs": None}
    assert [t["name"] for t in _tasks(spec, states_, run, opts)] == [
        "e4-b1-noexit-joint-k3", "e4-b1-x4-separate-k3", "e2-b1-x2-joint-k3"]  # 1/2, then 1/3, then new

    held = run / "e4-b1-x4-separate-k3"
    before = files_of(held)
    with _point_lock(held).acquire(timeout=0):  # as another sweep process training it would hold it
        dry = sweep(tmp_path, tiny_cifar, only=only, dry_run=True)
        assert states(dry)["e4-b1-x4-separate-k3"] == "running"
        s = sweep(tmp_path, tiny_cifar, only=only)
        assert states(s) == {"e2-b1-x2-joint-k3": "done", "e4-b1-x4-separate-k3": "running",
                             "e4-b1-noexit-joint-k3": "done"}
        assert files_of(held) == before  # not trained, not evaluated, no log line
    assert {r["name"] for r in read_rows(tmp_path / "store.json")} == {"e2-b1-x2-joint-k3", "e4-b1-noexit-joint-k3"}
    s = sweep(tmp_path, tiny_cifar, only=only)  # released: the next run finishes it
    assert states(s)["e4-b1-x4-separate-k3"] == "done"


def kept_tiny_point(tmp_path, data):
    """The tiny sweep with ``keep`` (under tmp_path/ck), one point run to the end: (spec path, --only list)."""
    spec = tmp_path / "keep.toml"
    spec.write_text(TINY.read_text().replace("separate_exit_epochs", f'keep = "{tmp_path}/ck/t-{{name}}"\n'
                                             "separate_exit_epochs"))
    only = ["e2-b1-x2-joint-k3"]
    sweep(tmp_path, data, spec=spec, only=only)
    return spec, only


def test_reevaluate_measures_finished_points_again_without_training(tmp_path, tiny_cifar):
    spec, only = kept_tiny_point(tmp_path, tiny_cifar)
    store = tmp_path / "store.json"
    first = read_rows(store)
    assert {(r["eval_device"], r["arithmetic"]) for r in first} == {("cpu", "ieee fp32")}
    # rows measured before they recorded their arithmetic (as the CUDA rows measured under TF32 were)
    store.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("eval_device", "arithmetic")}
                                 for r in first]))
    kept = tmp_path / "ck/t-e2-b1-x2-joint-k3"
    weights = (kept / "model.safetensors").read_bytes()
    run_files = files_of(tmp_path / "runs/tiny/e2-b1-x2-joint-k3/checkpoint")
    s = sweep(tmp_path, tiny_cifar, spec=spec, only=only, reevaluate=True)
    assert states(s) == {"e2-b1-x2-joint-k3": "done"} and s["points"][0]["detail"] == "3 rows written"
    again = read_rows(store)
    assert again == first  # same checkpoint, same device: the same figures, and the fields back
    assert (kept / "model.safetensors").read_bytes() == weights
    assert files_of(tmp_path / "runs/tiny/e2-b1-x2-joint-k3/checkpoint") == run_files  # nothing trained
    assert not (tmp_path / "ck/calibration.png").exists()
    assert "re-evaluating" in (tmp_path / "runs/tiny/e2-b1-x2-joint-k3/train.log").read_text()

    import shutil
    shutil.rmtree(kept)  # rows citing a checkpoint that is not here: refused with one line
    with pytest.raises(SweepError, match="not one checkpoint that exists here"):
        sweep(tmp_path, tiny_cifar, spec=spec, only=only, reevaluate=True)


def test_a_schedule_override_keeps_its_own_checkpoint(tmp_path, tiny_cifar):
    spec, only = kept_tiny_point(tmp_path, tiny_cifar)
    default = tmp_path / "ck/t-e2-b1-x2-joint-k3"
    weights = (default / "model.safetensors").read_bytes()
    run_sweep(spec, data_dir=tiny_cifar, runs=tmp_path / "runs", results=tmp_path / "store-ep3.json", epochs=3,
              only=only, progress=False)
    assert (default / "model.safetensors").read_bytes() == weights  # the default schedule's rows still hold
    assert {r["checkpoint"] for r in read_rows(tmp_path / "store.json")} == {str(default)}
    long = read_rows(tmp_path / "store-ep3.json")
    assert {r["checkpoint"] for r in long if r["name"] != "fp32"} == {str(tmp_path / "ck/t-e2-b1-x2-joint-k3-ep3")}
    assert {r["epochs"] for r in long if r["name"] != "fp32"} == {3}
