#!/usr/bin/env python3
"""One bounded call of a GPU window (issues 40 and 41): train a named queue of runs until a wall-clock budget, stop
cleanly at the runs' epoch checkpoints, and resume from the same folder on the next call.

The device machine receives the checkout and the paths named in ``carry`` (64 MiB in all, ../shared and data/ not
included), keeps ignored paths between calls while it stays warm (30 s after a call), and gives back at most 8 files
of 16 MiB from $OUT. So:

* The dataset travels as lossless WebP mosaics (CIFAR-10's 60,000 images: about 100 MB at 4.4 bits per value,
  against 184 MB raw) cut into parts that each fit one call beside the tree (``pack-data``, here, once). ``run``
  rebuilds the official archive layout from the parts (each checked by SHA-256), so a run's data checksum is the
  same there as here: the runs resume anywhere, and are calibrated and tested here (``--evaluate`` does it there).
* The state folder (``runs/gpu-window``: the runs and sweep points in training, a log of every call) travels as a
  carried path, and comes back from ``run --out $OUT`` as tar chunks that ``unpack`` extracts here. Each state
  carries an id; ``run --state-id`` refuses to train on another state (a machine that went cold and lost it), so a
  run is never silently restarted from scratch and its progress overwritten.

Queues (``sweeps/gpu-window.toml``): training runs (the FP32 teachers, the long headline) and sweep specs whose
points train (``sweeps/*-long*.toml``). Ready runs train side by side in processes sharing the device (``--workers``),
sweep points with the sweep's own workers; an item whose init or teacher checkpoint does not exist yet waits.

Here, once per dataset (3 parts of about 34.5 MB for CIFAR-10; a few minutes of one core):
    python scripts/gpu_window.py pack-data --dataset cifar10 --data-dir data
    python scripts/gpu_window.py pack-data --dataset cifar100 --data-dir data
The device tool's calls of one window, each right after the previous one (the machine keeps what earlier calls
carried for 30 s after each call; the tree is about 16 MB, so a call carries one part and at most ~16 MB of state,
or the state alone when it is larger; ID: "new" the first time, then what the last call or ``unpack`` printed):
    run(command="python3 scripts/gpu_window.py check --dataset cifar10",
        carry=["runs/gpu-data/cifar10/part-0", "runs/gpu-window"], timeout_s=120)
    run(command="python3 scripts/gpu_window.py check --dataset cifar10",
        carry=["runs/gpu-data/cifar10/part-1"], timeout_s=120)
    run(command="PYTHONUNBUFFERED=1 python3 scripts/gpu_window.py run c10-teacher c10-headline c10-long --workers 4
        --budget-s 540 --state-id ID --out $OUT", carry=["runs/gpu-data/cifar10/part-2"], timeout_s=590)
then here:
    python scripts/gpu_window.py unpack FILES_AT      (the reply's files_at; prints the next --state-id)
    hybridexit sweep sweeps/paper-cifar10-long.toml --data-dir data --runs runs/gpu-window/sweeps --workers 2
and a finished teacher or headline run (runs/gpu-window/runs/NAME, evaluated here on validation, then test once) is
copied to checkpoints/NAME, which the items that start from it wait for.
A tiny rehearsal on the CPU (every item at 1 epoch per stage on 256 images; the sweeps calibrated and tested):
    python scripts/gpu_window.py run c10-teacher c10-headline c10-long --tiny --evaluate --device cpu --workers 1 \
        --data-dir data --state runs/gpu-tiny --tiny-val-size 1000 \
        --substitute checkpoints/c10-r32-fp32-long=checkpoints/c10-r32-fp32
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import secrets
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the device machine runs the checkout as it is (nothing installed)

QUEUES = ROOT / "sweeps" / "gpu-window.toml"
PER_ROW = 100  # images per mosaic row (3,200 pixels: WebP allows 16,383 per side)
CHUNK_MIB = 15  # state tar chunks brought back from $OUT (16 MiB per file at most)


class WindowError(Exception):
    """What the caller must fix (a missing data part, another state): one line, exit status 2."""


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---- the training set as WebP mosaic parts -------------------------------------------------------------------------

def _mosaic(images):
    """uint8 (n, 3, 32, 32), n a multiple of PER_ROW -> (rows * 32, PER_ROW * 32, 3)."""
    n = len(images)
    a = images.transpose(0, 2, 3, 1).reshape(n // PER_ROW, PER_ROW, 32, 32, 3)
    return a.transpose(0, 2, 1, 3, 4).reshape(n // PER_ROW * 32, PER_ROW * 32, 3)


def _unmosaic(m, n: int):
    rows = m.shape[0] // 32
    a = m.reshape(rows, 32, PER_ROW, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * PER_ROW, 32, 32, 3)
    return a[:n].transpose(0, 3, 1, 2)


def pack_data(name: str, data_dir, out: Path, parts: int, quality: int = 75, method: int = 4) -> dict:
    """Write ``out/<name>/part-K/`` (an images.webp mosaic and the manifest) for the training then the test
    images of ``name``, in the archive's order."""
    import numpy as np
    from PIL import Image

    from hybridexit.data import load_cifar

    ds = load_cifar(name, data_dir, download_ok=False)
    images = np.concatenate([ds.train.images.numpy(), ds.test.images.numpy()])
    labels = np.concatenate([ds.train.labels.numpy(), ds.test.labels.numpy()]).astype(np.int64)
    n = len(images)
    bounds = [round(n * k / parts / PER_ROW) * PER_ROW for k in range(parts)] + [n]
    dest = out / name
    shutil.rmtree(dest, ignore_errors=True)
    entries = []
    for k in range(parts):
        lo, hi = bounds[k], bounds[k + 1]
        chunk = images[lo:hi]
        pad = (-len(chunk)) % PER_ROW
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, 3, 32, 32), np.uint8)])
        buf = io.BytesIO()
        Image.fromarray(_mosaic(chunk)).save(buf, format="WEBP", lossless=True, quality=quality, method=method)
        folder = dest / f"part-{k}"
        folder.mkdir(parents=True)
        (folder / "images.webp").write_bytes(buf.getvalue())
        entries.append({"part": f"part-{k}", "start": lo, "count": hi - lo, "bytes": len(buf.getvalue()),
                        "sha256_pixels": _sha256(images[lo:hi].tobytes()), "sha256_file": _sha256(buf.getvalue())})
    manifest = {"dataset": name, "n": n, "n_train": len(ds.train), "classes": ds.classes, "labels": labels.tolist(),
                "parts": entries,
                "source_checksum": ds.checksum, "source_content": ds.content,
                "format": f"lossless WebP mosaics, {PER_ROW} images per row, quality {quality}, method {method}"}
    for e in entries:
        (dest / e["part"] / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _parts_state(folder: Path) -> tuple[dict | None, list[str]]:
    """(the manifest, the parts missing) of a dataset folder of parts."""
    found = sorted(folder.glob("part-*/manifest.json"))
    if not found:
        return None, ["all (no part-*/ folder)"]
    manifest = json.loads(found[0].read_text())
    missing = [e["part"] for e in manifest["parts"] if not (folder / e["part"] / "images.webp").is_file()]
    return manifest, missing


def assemble(name: str, data_root: Path) -> Path:
    """The official archive layout rebuilt from the parts under ``data_root/<name>/layout`` (pixels and labels
    as the archive's: the same dataset checksum); kept there for the next call while the machine stays warm.
    Returns the data dir."""
    import numpy as np
    from PIL import Image

    from hybridexit.data import DATASETS

    folder, spec = data_root / name, DATASETS[name]
    layout = folder / "layout"
    manifest, missing = _parts_state(folder)
    if missing:
        raise WindowError(f"{name}: data parts missing on this machine: {', '.join(missing)}; carry "
                          f"{' and '.join(str(folder / m) for m in missing if m.startswith('part-'))} "
                          f"(pack them here with: python scripts/gpu_window.py pack-data --dataset {name})")
    done = layout / "assembled.json"
    if done.is_file() and json.loads(done.read_text()).get("source_checksum") == manifest["source_checksum"]:
        return layout
    images = np.zeros((manifest["n"], 3, 32, 32), np.uint8)
    for e in manifest["parts"]:
        raw = (folder / e["part"] / "images.webp").read_bytes()
        m = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        chunk = _unmosaic(m, e["count"])
        if _sha256(np.ascontiguousarray(chunk).tobytes()) != e["sha256_pixels"]:
            raise WindowError(f"{name}: {e['part']} does not decode to the packed pixels (SHA-256 differs): pack it again")
        images[e["start"]:e["start"] + e["count"]] = chunk
    labels = manifest["labels"]
    out = layout / spec["folder"]
    shutil.rmtree(layout, ignore_errors=True)
    out.mkdir(parents=True)
    n_train = manifest["n_train"]
    for names, lo, hi in ((spec["train"], 0, n_train), (spec["test"], n_train, len(images))):
        per = -(-(hi - lo) // len(names))
        for i, member in enumerate(names):
            sl = slice(lo + i * per, min(hi, lo + (i + 1) * per))
            blob = {spec["label_key"]: labels[sl], "data": images[sl].reshape(-1, 3072)}
            (out / member).write_bytes(pickle.dumps(blob, protocol=4))
    meta_file, meta_key = spec["meta"]
    (out / meta_file).write_bytes(pickle.dumps({meta_key: manifest["classes"]}, protocol=4))
    done.write_text(json.dumps({"source_checksum": manifest["source_checksum"], "n": len(images)}))
    return layout


# ---- the queue -----------------------------------------------------------------------------------------------------

def load_queue(names: list[str], path: Path = QUEUES) -> list[dict]:
    """The items of the named queues, in order: {"kind": "run", ...} and {"kind": "sweep", "spec": path}."""
    from hybridexit.workflows.recipes import read_toml

    queues = read_toml(path, "queue file", "sweeps/gpu-window.toml")
    items = []
    for name in names:
        if name not in queues:
            raise WindowError(f"unknown queue {name!r}; the queues of {path}: {', '.join(queues)}")
        q = queues[name]
        items += [dict(r, kind="run", queue=name) for r in q.get("run", [])]
        items += [{"kind": "sweep", "spec": s, "queue": name} for s in q.get("sweeps", [])]
    return items


def _run_configs(item: dict, tiny: dict | None):
    """(HybridConfig, TrainConfig) of a run item (its recipe, network fields and dataset)."""
    from hybridexit.data import DATASETS
    from hybridexit.model.resnet import HybridConfig
    from hybridexit.workflows.recipes import read_recipe
    from hybridexit.workflows.train import TrainConfig

    train_kw, network = read_recipe(ROOT / item["recipe"] if not Path(item["recipe"]).is_absolute() else item["recipe"])
    net_keys = {"depth", "edge_layers", "edge_bits", "exits"}
    net = {k: (tuple(v) if isinstance(v, list) else v) for k, v in item.items() if k in net_keys}
    train_kw.update(item.get("train", {}))  # the item's own training fields (a seed, say)
    if tiny:
        train_kw = _tiny_train(train_kw, tiny)
    d = DATASETS[item["dataset"]]
    cfg = HybridConfig(num_classes=d["num_classes"], mean=d["mean"], std=d["std"], **{"depth": 32, **net}, **network)
    return cfg, TrainConfig(**train_kw)


def _tiny_train(kw: dict, tiny: dict) -> dict:
    """A recipe cut to the rehearsal's schedule: at most ``epochs`` per stage, ``limit_train`` images."""
    kw = dict(kw, epochs=min(kw.get("epochs", 30), tiny["epochs"]), limit_train=tiny["limit_train"])
    for k in ("stage1_epochs", "exit_epochs"):
        if kw.get(k):
            kw[k] = min(kw[k], tiny["epochs"])
    if tiny.get("val_size") is not None:
        kw["val_size"] = tiny["val_size"]
    if tiny.get("fp32"):
        kw["bf16"] = False
    for k in ("init", "teacher"):
        if kw.get(k):
            kw[k] = tiny["substitute"].get(kw[k], kw[k])
    return kw


def _tiny_spec(spec_path: str, state: Path, tiny: dict) -> Path:
    """The sweep spec with a rehearsal recipe, its checkpoints substituted, its stores and kept copies in the state."""
    from hybridexit.workflows.recipes import read_toml

    d = read_toml(ROOT / spec_path, "sweep file", spec_path)
    folder = state / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    recipe = read_toml(ROOT / d["recipe"], "recipe", d["recipe"])
    recipe = {k: v for k, v in recipe.items() if k != "description"}
    recipe = _tiny_train(recipe, tiny)
    rpath = folder / f"recipe-{d['name']}.toml"
    rpath.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in recipe.items()))
    d = dict(d, recipe=str(rpath), results=str(folder / f"sweep-{d['name']}.json"),
             keep=str(folder / "keep" / f"{d['name']}-{{name}}"),
             separate_exit_epochs=min(d.get("separate_exit_epochs", 1), tiny["epochs"]))
    for k in ("init", "teacher", "reference"):
        if k in d:
            d[k] = tiny["substitute"].get(d[k], d[k])
    if tiny.get("depth"):
        d["depth"] = tiny["depth"]
    path = folder / Path(spec_path).name
    path.write_text(_toml(d))
    return path


def _toml(d: dict) -> str:
    """A sweep spec back as TOML (scalars, lists, the [calibrate] table and the [[grid]] tables)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in d.items() if not isinstance(v, (dict, list)) or
             (isinstance(v, list) and k != "grid")]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    for g in d.get("grid", []):
        lines += ["[[grid]]"] + [f"{kk} = {json.dumps(vv)}" for kk, vv in g.items()]
    return "\n".join(lines) + "\n"


def _missing_inputs(tcfg) -> list[str]:
    return [p for p in (tcfg.init, tcfg.teacher) if p and not (ROOT / p / "config.json").exists()
            and not (Path(p) / "config.json").exists()]


def _train_one(job: dict) -> dict:
    """One run to the deadline (a worker process: the device is shared with the other runs)."""
    import torch

    from hybridexit.data import load_cifar
    from hybridexit.workflows.train import TrainConfig, train

    os.chdir(ROOT)
    torch.set_num_threads(job["threads"])
    if job["share"] and job["device"].startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(job["share"], torch.device(job["device"]))
    from hybridexit.model.resnet import HybridConfig

    net, tcfg = HybridConfig.from_dict(job["net"]), TrainConfig.from_dict(job["train"])
    out = Path(job["out"])
    with open(out.with_suffix(".log"), "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        ds = load_cifar(job["dataset"], job["data_dir"], download_ok=False)
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} on {job['device']}, deadline in "
              f"{job['deadline'] - time.time():.0f} s", flush=True)
        meta = train(out, net, tcfg, ds, resume=(out / "config.json").exists(), device=job["device"], progress=False,
                     deadline=job["deadline"])
    return {"name": job["name"], "epochs_done": meta["epochs_done"], "total": tcfg.total_epochs,
            "last_epoch_s": json.loads((out / "train_state.json").read_text())["history"][-1]["epoch_s"]}


def _epochs_done(ck: Path) -> int:
    try:
        return json.loads((ck / "config.json").read_text()).get("epochs_done", 0)
    except (OSError, json.JSONDecodeError):
        return 0


def run_queue(a) -> dict:
    t_start = time.time()
    deadline = t_start + a.budget_s - a.margin_s
    state = Path(a.state)
    state.mkdir(parents=True, exist_ok=True)
    record_path = state / "window.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"state_id": None, "calls": []}
    if a.state_id and a.state_id != (record["state_id"] or "new"):
        raise WindowError(f"the state folder {state} here is {record['state_id'] or 'new'}, not {a.state_id}: the "
                          f"machine lost it (carry {state} again) or the id is stale (python scripts/gpu_window.py "
                          f"unpack prints the current one)")
    tiny = None
    if a.tiny:
        tiny = {"epochs": 1, "limit_train": a.tiny_limit, "val_size": a.tiny_val_size, "depth": a.tiny_depth,
                "fp32": a.tiny_fp32,
                "substitute": dict(s.split("=", 1) for s in a.substitute)}
    items = load_queue(a.queues, Path(a.queue_file))
    import torch

    from hybridexit.device import pick_device

    device = str(pick_device(a.device or None))
    datasets = sorted({i["dataset"] for i in items if i["kind"] == "run"} |
                      {_spec_dataset(i["spec"]) for i in items if i["kind"] == "sweep"})
    data_dirs = {d: (Path(a.data_dir) if a.data_dir else assemble(d, Path(a.data))) for d in datasets}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    call = {"start": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "queues": a.queues, "budget_s": a.budget_s, "workers": a.workers, "items": []}
    runs = [i for i in items if i["kind"] == "run"]
    jobs = []
    for item in runs:
        net, tcfg = _run_configs(item, tiny)
        out = state / "runs" / item["name"]
        before = _epochs_done(out)
        entry = {"name": item["name"], "kind": "run", "epochs_before": before, "total": tcfg.total_epochs}
        call["items"].append(entry)
        if before >= tcfg.total_epochs:
            entry["status"] = "trained"
        elif _missing_inputs(tcfg):
            entry["status"] = f"waiting for {', '.join(_missing_inputs(tcfg))}"
        elif time.time() >= deadline:
            entry["status"] = "not started: the budget is spent"
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            jobs.append({"name": item["name"], "net": net.to_dict(), "train": tcfg.to_dict(), "out": str(out),
                         "dataset": item["dataset"], "data_dir": str(data_dirs[item["dataset"]]), "device": device,
                         "deadline": deadline, "threads": max(1, cpus // max(1, min(a.workers, len(runs)))),
                         "share": round(0.95 / a.workers, 3) if a.workers > 1 else None})
    for res in _parallel(jobs, a.workers):
        entry = next(e for e in call["items"] if e["name"] == res["name"])
        entry.update(res, status="trained" if res.get("epochs_done", 0) >= entry["total"] else res.get("status", "partial"))
    for item in (i for i in items if i["kind"] == "sweep"):
        call["items"].append(_sweep_item(item, a, state, device, data_dirs, deadline, tiny))
    call["wall_s"] = round(time.time() - t_start, 1)
    record["calls"].append(call)
    record["state_id"] = secrets.token_hex(6)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    if a.out:
        pack_state(state, Path(a.out))
    return {"state_id": record["state_id"], **call}


def _spec_dataset(spec: str) -> str:
    from hybridexit.workflows.recipes import read_toml

    return read_toml(ROOT / spec, "sweep file", spec)["dataset"]


def _parallel(jobs: list[dict], workers: int):
    """The runs side by side in spawned processes (each its own CUDA context on the shared device)."""
    if not jobs:
        return
    if workers == 1 or len(jobs) == 1:
        for j in jobs:
            yield _guarded(j)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
        yield from ex.map(_guarded, jobs)


def _guarded(job: dict) -> dict:
    try:
        return _train_one(job)
    except Exception as e:  # noqa: BLE001 - recorded in the window's log; the other runs go on
        return {"name": job["name"], "status": f"failed: {type(e).__name__}: {e}"}


def _sweep_item(item: dict, a, state: Path, device: str, data_dirs: dict, deadline: float, tiny) -> dict:
    from hybridexit.errors import HybridExitError
    from hybridexit.workflows.sweep import load_sweep, run_sweep

    spec_path = _tiny_spec(item["spec"], state, tiny) if tiny else ROOT / item["spec"]
    spec = load_sweep(spec_path)
    entry = {"name": spec.name, "kind": "sweep"}
    waiting = [p for p in (spec.train.get("init"), spec.train.get("teacher"), spec.reference)
               if p and not (Path(p) / "config.json").exists()]
    if waiting:
        return dict(entry, status=f"waiting for {', '.join(sorted(set(waiting)))}")
    if time.time() >= deadline:
        return dict(entry, status="not started: the budget is spent")
    try:
        summary = run_sweep(spec_path, workers=a.workers, device=device, data_dir=data_dirs[spec.dataset],
                            runs=state / "sweeps", progress=False, deadline=deadline, train_only=not a.evaluate,
                            only=a.only or None,
                            results=(state / "results" / f"{spec.name}.json") if not tiny else None)
    except HybridExitError as e:
        return dict(entry, status=f"failed: {e}")
    return dict(entry, status="ran", points={p["name"]: f"{p['state']}: {p['detail']}" for p in summary["points"]})


# ---- the state's trip back -----------------------------------------------------------------------------------------

def _skip(rel: Path, state: Path) -> bool:
    """Leave out of the state's tar: lock and temporary files, and the resumable state of finished runs."""
    if any(part.endswith((".lock", ".tmp", ".old")) for part in rel.parts):
        return True
    if rel.name.startswith("train_state"):
        try:
            from hybridexit.workflows.train import TrainConfig

            meta = json.loads((state / rel.parent / "config.json").read_text())
            return meta["epochs_done"] >= TrainConfig.from_dict(meta["train"]).total_epochs
        except (OSError, KeyError, ValueError):
            return False
    return False


def pack_state(state: Path, out: Path) -> list[Path]:
    """The state folder as ``state.tar.NN`` chunks of CHUNK_MIB under ``out`` (at most 8 come back)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(state.rglob("*")):
            if p.is_file() and not _skip(p.relative_to(state), state):
                tar.add(p, arcname=str(p.relative_to(state)))
    data, size = buf.getvalue(), CHUNK_MIB << 20
    out.mkdir(parents=True, exist_ok=True)
    chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    if len(chunks) > 7:
        raise WindowError(f"the state is {len(data) >> 20} MiB: more than 7 chunks of {CHUNK_MIB} MiB come back; "
                          "evaluate and remove finished points here first")
    paths = []
    for i, c in enumerate(chunks):
        paths.append(out / f"state.tar.{i:02d}")
        paths[-1].write_bytes(c)
    return paths


def unpack(files_at: Path, state: Path) -> str:
    """Extract the chunks of ``files_at`` over the state folder; returns the new state id."""
    chunks = sorted(files_at.rglob("state.tar.*"))
    if not chunks:
        raise WindowError(f"no state.tar.NN in {files_at}")
    data = b"".join(c.read_bytes() for c in chunks)
    state.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(state, filter="data")
    return json.loads((state / "window.json").read_text())["state_id"]


def check(a) -> dict:
    """What this machine holds: each dataset's parts, the state folder and its id."""
    out = {}
    for name in a.dataset:
        manifest, missing = _parts_state(Path(a.data) / name)
        out[name] = "complete" if manifest and not missing else f"missing {', '.join(missing)}"
    rec = Path(a.state) / "window.json"
    out["state_id"] = json.loads(rec.read_text())["state_id"] if rec.exists() else "new"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack-data", help="here: the training split as WebP parts to carry")
    pk.add_argument("--dataset", required=True, choices=["cifar10", "cifar100"])
    pk.add_argument("--data-dir", default="data")
    pk.add_argument("--out", default="runs/gpu-data")
    pk.add_argument("--parts", type=int, default=3)
    ck = sub.add_parser("check", help="on the device: which data parts and which state are here")
    ck.add_argument("--dataset", nargs="+", default=["cifar10"])
    ck.add_argument("--data", default="runs/gpu-data")
    ck.add_argument("--state", default="runs/gpu-window")
    r = sub.add_parser("run", help="train the named queues until the budget")
    r.add_argument("queues", nargs="+")
    r.add_argument("--queue-file", default=str(QUEUES))
    r.add_argument("--state", default="runs/gpu-window")
    r.add_argument("--state-id", default=None, help="refuse any other state (printed by the last call and by unpack)")
    r.add_argument("--data", default="runs/gpu-data", help="the carried parts (pack-data's --out)")
    r.add_argument("--data-dir", default=None, help="an official CIFAR layout instead of the parts (here)")
    r.add_argument("--device", default=None)
    r.add_argument("--workers", type=int, default=4, help="runs (or sweep points) side by side on the device")
    r.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of this call")
    r.add_argument("--margin-s", type=float, default=45.0, help="kept for the last epoch's overrun and the packing")
    r.add_argument("--out", default=None, help="write the state's tar chunks here ($OUT)")
    r.add_argument("--evaluate", action="store_true", help="also calibrate and test the sweeps' points")
    r.add_argument("--only", nargs="*", default=[], metavar="PATTERN", help="the sweeps' points matching these only")
    r.add_argument("--tiny", action="store_true", help="rehearsal: 1 epoch per stage on --tiny-limit images")
    r.add_argument("--tiny-limit", type=int, default=256)
    r.add_argument("--tiny-val-size", type=int, default=None)
    r.add_argument("--tiny-depth", type=int, default=None)
    r.add_argument("--tiny-fp32", action="store_true", help="rehearsal without bf16 (slow on CPUs without bf16 units)")
    r.add_argument("--substitute", nargs="*", default=[], metavar="OLD=NEW", help="rehearsal: checkpoints to use")
    u = sub.add_parser("unpack", help="here: extract a call's state chunks")
    u.add_argument("files_at")
    u.add_argument("--state", default="runs/gpu-window")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    try:
        if a.cmd == "pack-data":
            m = pack_data(a.dataset, a.data_dir, Path(a.out), a.parts)
            for e in m["parts"]:
                print(f"{a.out}/{a.dataset}/{e['part']}: {e['count']} images, {e['bytes'] / 2**20:.1f} MiB")
        elif a.cmd == "check":
            print(json.dumps(check(a)))
        elif a.cmd == "run":
            if a.budget_s <= a.margin_s:
                raise WindowError(f"--budget-s {a.budget_s} leaves nothing after --margin-s {a.margin_s}")
            res = run_queue(a)
            for e in res["items"]:
                print(json.dumps(e))
            size = sum(f.stat().st_size for f in Path(a.state).rglob("*") if f.is_file() and "layout" not in f.parts)
            print(f"device {res['device_name']}, {res['wall_s']} s, state {size / 2**20:.1f} MiB; next call: "
                  f"--state-id {res['state_id']}")
        elif a.cmd == "unpack":
            print(f"next call: --state-id {unpack(Path(a.files_at), Path(a.state))}")
    except WindowError as e:
        return _refuse(e)
    return 0


def _refuse(e: WindowError) -> int:
    """What the caller must fix, in one line on stderr; exit status 2."""
    print(f"gpu_window: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
