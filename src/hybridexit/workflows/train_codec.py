"""A learned bottleneck at the split: a small edge-side reduction, a b-bit quantizer, a cloud-side expansion.

Edge side: 1x1 conv C -> c (no bias) and BatchNorm (folded at inference into one 1x1 conv with bias), then a
uniform mid-rise quantizer with a learned step per code channel: symbol ``r = clamp(round(z / s - 1/2), -L/2,
L/2 - 1) + L/2`` in [0, L), L = 2^bits, value ``(r - L/2 + 1/2) * s``. Only the symbols leave the device
(entropy-coded by ``codecs.LearnedCodec``). Cloud side: 1x1 conv c -> C with bias, giving back a (C, H, W) map
for the cloud half. Gradients pass the rounding by a straight-through estimator (LSQ-style: the step gets the
gradient of ``value = r * s``).

Training (``train_bottleneck``, one stage; ``train_codec``, a recipe's stages): the edge half and its exits are
frozen (weights and BatchNorm statistics), so the exits' decisions and calibrated thresholds stay valid and the edge
tensors are bit-identical; the bottleneck and the cloud half are trained on the frozen edge's features of augmented
training images, distilled from the checkpoint's own cloud half on the unquantized features (the hybrid with the
fp32 codec) plus cross-entropy. The edge features of a few augmented views of the training split are computed once
and cached (float16, memory-mapped) in the run directory: augmentation happens before the edge, so each view is a
fixed crop/flip of every image, drawn from a seeded generator.

Each stage is a phase of ``train.run_schedule``, the one training loop (``_Stage``: set-up, one epoch, checkpoint):
after every epoch a stage folder's ``state/`` holds its weights (``model.safetensors``: ``bottleneck.*``,
``cloud.*``), optimizer and RNG states (``train_state.safetensors`` / ``train_state.json``, as ``train.py``'s
checkpoints) and its log so far, so an interrupted run resumes exactly; ``best/`` holds the epoch with the best
validation accuracy of the offloaded samples (``model.safetensors`` + ``best.json``), which stage 2 starts from and
``export_codec`` exports. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..codecs.bottleneck_net import GAUSS_STEP, Bottleneck, BottleneckConfig  # noqa: F401  (the module and its config)
from ..errors import ConfigError


# ---------------------------------------------------------------------------------------------- training
def _edge_features(edge, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The frozen edge's features of raw uint8 images (the network normalizes them itself)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(edge(images[i:i + batch]).contiguous())
    return torch.cat(out)


def _view_key(init: str, split, seed: int) -> dict:
    """What the cached views hold: the edge of ``init`` (its weights' sha256) on ``split`` (its images and labels in
    this order; features are matched to labels by position, so the order is part of the key); each view adds its
    number."""
    import hashlib

    from ..data.datasets import checksum

    weights = hashlib.sha256((Path(init) / "model.safetensors").read_bytes()).hexdigest()
    return {"model_sha256": weights, "split_sha256": checksum(split), "n": len(split), "seed": seed}


def _cache_views(run: Path, edge, cloud0, split, bcfg: BottleneckConfig, log, init: str) -> list[tuple]:
    """Edge features (float16, memory-mapped) and the original cloud's logits of ``views`` augmented views.
    Each view's ``view{v}.json`` names what it holds; a view made for other data, another order or another edge
    is refused (its features would no longer line up with the labels)."""
    from ..data.datasets import augment

    n, shape = len(split), tuple(edge.feature_shape)
    base, out = _view_key(init, split, bcfg.seed), []
    for v in range(bcfg.views):
        fpath, lpath, kpath = run / f"view{v}.f16", run / f"view{v}.logits.npy", run / f"view{v}.json"
        key = {**base, "view": v}
        if lpath.exists() and (not kpath.exists() or json.loads(kpath.read_text()) != key):
            raise ConfigError(f"{fpath} was cached for another checkpoint, data or sample order: remove "
                              f"{run}/view{v}.* or choose another cache folder")
        if not lpath.exists():
            t0 = time.time()
            gen = torch.Generator().manual_seed(1000 * bcfg.seed + v)
            mm = np.lib.format.open_memmap(str(fpath) + ".tmp.npy", "w+", np.float16, (n, *shape))
            logits = np.zeros((n, cloud0.cfg.num_classes), np.float32)
            for i in range(0, n, 500):
                imgs = augment(split.images[i:i + 500], gen)
                f = _edge_features(edge, imgs)
                mm[i:i + len(f)] = f.half().numpy()
                with torch.no_grad():
                    logits[i:i + len(f)] = cloud0(f).numpy()
            mm.flush()
            del mm
            Path(str(fpath) + ".tmp.npy").rename(fpath)
            kpath.write_text(json.dumps(key, indent=2))
            np.save(lpath, logits)  # last: its presence marks the view complete
            log({"event": "cached_view", "view": v, "seconds": round(time.time() - t0, 1)})
        out.append((np.load(fpath, mmap_mode="r"), torch.from_numpy(np.load(lpath))))
    return out


@torch.no_grad()
def _val_accuracy(bneck, cloud, vf, vl, offloaded) -> tuple[float, float]:
    """Cloud accuracy with the bottleneck on all val samples, and on the offloaded ones only."""
    bneck.eval()
    cloud.eval()
    preds = torch.cat([cloud(bneck(vf[i:i + 500])).argmax(1) for i in range(0, len(vf), 500)])
    ok = preds == vl
    return float(ok.float().mean()), float(ok[offloaded].float().mean())


@torch.no_grad()
def _view_offloaded(edge, feats, policy, batch: int = 2000) -> torch.Tensor:
    """Which samples of a cached view the edge offloads at ``policy``'s thresholds, from the cached (float16)
    features: only for networks whose exits all read the split's features (the exit after the last edge block)."""
    from ..model.exits import exits_here

    cfg = edge.cfg
    last = cfg.edge_blocks - 1
    if policy is None or any(cfg.exit_after_block(b) is not None for b in range(last)) or cfg.exit_after_block(last) is None:
        raise ConfigError("offload_weight needs a calibrated checkpoint whose only exit reads the split's features "
                          "(exits after the last edge block); remove offload_weight from the recipe")
    j = cfg.exit_after_block(last)
    head = edge.exits[cfg.exit_key(j)].eval()
    temps = policy.temperatures or [1.0] * len(cfg.exits)
    out = []
    for i in range(0, len(feats), batch):
        f = torch.from_numpy(np.asarray(feats[i:i + batch], dtype=np.float32))
        out.append(~exits_here(head(f), policy.thresholds[j], temps[j])[0])
    return torch.cat(out)


STATE_DIR, BEST_DIR = "state", "best"  # a stage folder's resumable state and its best epoch (safetensors + JSON)
BEST_JSON = "best.json"  # in BEST_DIR: the epoch, the bottleneck's spec, its validation figures


def _weights(bneck, cloud) -> dict[str, torch.Tensor]:
    """What a stage trains, as one tensor dict: ``bottleneck.*`` and ``cloud.*`` (CloudNet keys)."""
    return {**{f"bottleneck.{k}": v for k, v in bneck.state_dict().items()},
            **{f"cloud.{k}": v for k, v in cloud.state_dict().items()}}


def _part(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def read_best(folder) -> dict:
    """A stage's best epoch (``BEST_DIR``, or a folder given as ``init_from``): ``bottleneck`` and ``cloud`` state
    dicts, ``epoch``, ``spec`` (``Bottleneck(**spec)``) and ``val`` (its log record)."""
    from ..model import checkpoint as ck

    folder = Path(folder)
    if not (folder / BEST_JSON).is_file():
        raise ConfigError(f"{folder} holds no best epoch of a codec stage ({BEST_JSON}): train it for at least one "
                          f"epoch first")
    tensors = ck.read_tensors(folder)
    return {**json.loads((folder / BEST_JSON).read_text()), "bottleneck": _part(tensors, "bottleneck"),
            "cloud": _part(tensors, "cloud")}


def _stage_state(stage: Path) -> dict | None:
    """A stage folder's resumable state (``train.schedule_state``'s JSON: epoch, history, ...), or None."""
    from ..model import checkpoint as ck

    f = stage / STATE_DIR / ck.STATE_JSON
    return json.loads(f.read_text()) if f.is_file() else None


class _Stage:
    """A codec stage as a phase of ``train.run_schedule``: ``name`` (the log's phase) and ``epochs``; ``folder``
    holds its config, log, ``state/`` and ``best/``; ``cache`` its cached views. ``start`` sets it up (loads the
    checkpoint, caches the views, builds the bottleneck from PCA or ``init_from``, restores the state of an
    interrupted run), ``epoch`` trains one epoch and validates, ``save`` checkpoints it."""

    def __init__(self, name: str, init: str, folder: Path, bcfg: BottleneckConfig, cache: Path, data_dir=None):
        self.name, self.init, self.folder, self.bcfg, self.cache, self.data_dir = name, init, folder, bcfg, cache, data_dir
        self.epochs = bcfg.epochs

    def want(self) -> dict:
        return {"init": self.init, "bottleneck": asdict(self.bcfg)}

    def done(self) -> list[dict]:
        """The history of the epochs this stage finished (refusing a folder that holds another config's run)."""
        cfg_path = self.folder / "config.json"
        if cfg_path.is_file() and json.loads(cfg_path.read_text()) != self.want():
            raise ConfigError(f"{self.folder} holds a run with another config: {cfg_path.read_text()}")
        st = _stage_state(self.folder)
        return st["history"] if st is not None and cfg_path.is_file() else []

    def log(self, rec: dict) -> None:
        with open(self.folder / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def start(self) -> None:
        # Over 40 lines: the set-up of a stage (data, views, modules, optimizer, resume) in the order it needs.
        from ..data.datasets import get_split, load_cifar
        from ..model.checkpoint import load_model, read_val_ids
        from .train import restore_schedule

        bcfg, self.folder = self.bcfg, Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.done()  # refuses another config's run
        (self.folder / "config.json").write_text(json.dumps(self.want(), indent=2))
        model, meta = load_model(self.init)
        d = meta["data"]
        edge, self.cloud0 = model.split()
        edge.eval()
        self.cloud0.eval()
        ds = load_cifar(d["name"], self.data_dir)
        ids = read_val_ids(self.init)  # the checkpoint's own hold-out, found by content (positions without a record)
        size, seed = d.get("val_size", 5000), d.get("split_seed", 0)
        self.train_split = get_split(ds, "train", size, seed, ids).limit(bcfg.limit_train)
        val_split = get_split(ds, "val", size, seed, ids)
        torch.manual_seed(bcfg.seed)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.views = _cache_views(self.cache, edge, self.cloud0, self.train_split, bcfg, self.log, self.init)
        self.vf, self.vl = _edge_features(edge, val_split.images), val_split.labels
        self.offloaded = _offloaded(edge, val_split, meta["policy"])
        self.bneck = Bottleneck(self.vf.shape[1], bcfg.code_channels, bcfg.bits, bcfg.refine)
        self.bneck.init_pca(torch.from_numpy(self.views[0][0][:2000].astype(np.float32)))
        _, self.cloud = model.split()
        if bcfg.init_from:
            st = read_best(bcfg.init_from)
            missing, unexpected = self.bneck.load_state_dict(st["bottleneck"], strict=False)
            if unexpected or any(not k.startswith(("enc.", "dec.")) for k in missing):  # a plain start may gain refine
                raise ConfigError(f"{bcfg.init_from} does not fit this bottleneck: missing {missing}, unexpected "
                                  f"{unexpected}")
            self.cloud.load_state_dict(st["cloud"])
        k = bcfg.match_blocks
        self.tuned = self.cloud.blocks[:k] if k else self.cloud  # the part of the cloud that learns; the rest stays
        groups = [{"params": list(self.bneck.parameters()), "lr": bcfg.lr}]
        if bcfg.tune_cloud:
            groups.append({"params": list(self.tuned.parameters()), "lr": bcfg.cloud_lr})
        else:  # the checkpoint's own cloud reads the codec's output: gradients pass it, its weights stay
            self.cloud.requires_grad_(False)
        self.sample_weights = [None] * len(self.views)
        if bcfg.offload_weight != 1.0:
            for v, (feats, _) in enumerate(self.views):
                off = _view_offloaded(edge, feats, meta["policy"])
                self.sample_weights[v] = torch.where(off, bcfg.offload_weight, 1.0)
                self.log({"event": "offload_weights", "view": v, "offloaded": float(off.float().mean())})
        self.opt = torch.optim.AdamW(groups, weight_decay=bcfg.weight_decay)
        self.gen = torch.Generator().manual_seed(bcfg.seed)  # the order of the training samples, epoch after epoch
        if _stage_state(self.folder) is not None:
            from ..model import checkpoint as ck

            w = ck.read_tensors(self.folder / STATE_DIR)
            self.bneck.load_state_dict(_part(w, "bottleneck"))
            self.cloud.load_state_dict(_part(w, "cloud"))
            restore_schedule(self.folder / STATE_DIR, [self.opt], self.gen)
        else:
            acc, acc_off = _val_accuracy(self.bneck, self.cloud, self.vf, self.vl, self.offloaded)
            self.log({"event": "init", "from": bcfg.init_from or "pca", "val_cloud_acc": acc,
                      "val_offloaded_acc": acc_off})

    def epoch(self, phase_epoch: int) -> dict:
        """One epoch on the cached view ``phase_epoch % views`` (cosine schedule over the stage's steps), then the
        validation accuracy of the cloud with the bottleneck, on all samples and on the offloaded ones."""
        from .train import _lr_at

        bcfg, n = self.bcfg, len(self.train_split)
        feats, tlogits = self.views[phase_epoch % len(self.views)]
        wv_all = self.sample_weights[phase_epoch % len(self.views)]
        self.bneck.train()
        self.cloud.eval()
        if bcfg.tune_cloud:
            self.tuned.train()
        per_epoch = math.ceil(n / bcfg.batch_size)
        perm = torch.randperm(n, generator=self.gen)
        tot, seen = 0.0, 0
        for b, i in enumerate(range(0, n, bcfg.batch_size)):
            idx = perm[i:i + bcfg.batch_size].sort().values
            f = torch.from_numpy(feats[idx.numpy()].astype(np.float32))
            y, tl = self.train_split.labels[idx], tlogits[idx]
            for g, base in zip(self.opt.param_groups, (bcfg.lr, bcfg.cloud_lr)):
                g["lr"] = _lr_at(phase_epoch * per_epoch + b, bcfg.epochs * per_epoch, 0, base)
            wv = None if wv_all is None else wv_all[idx]
            k = bcfg.match_blocks
            loss = (_match_loss(self.bneck, self.cloud0, self.tuned, f, k, wv) if k
                    else _kd_loss(self.cloud(self.bneck(f)), tl, y, bcfg, wv))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            tot += float(loss.detach()) * len(idx)
            seen += len(idx)
        acc, acc_off = _val_accuracy(self.bneck, self.cloud, self.vf, self.vl, self.offloaded)
        return {"epoch": phase_epoch + 1, "loss": tot / seen, "val_cloud_acc": acc, "val_offloaded_acc": acc_off}

    def save(self, history: list[dict], wall: float) -> None:
        """The epoch just logged (``history[-1]``, this stage's): the log line, the state (``STATE_DIR``: weights,
        optimizer and RNG states, the stage's log so far) and, when its offloaded accuracy is the best so far, the
        best epoch (``BEST_DIR``, what stage 2 and export read)."""
        from ..model import checkpoint as ck
        from .train import schedule_state

        rec = history[-1]
        self.log(rec)
        st_json, st_tensors = schedule_state([self.opt], self.gen, rec["epoch"], history, wall)
        weights = _weights(self.bneck, self.cloud)
        ck.write_checkpoint(self.folder / STATE_DIR, {ck.STATE_JSON: st_json}, {ck.MODEL_FILE: weights,
                                                                              ck.STATE_FILE: st_tensors})
        if rec["val_offloaded_acc"] >= max(h["val_offloaded_acc"] for h in history):
            best = {"epoch": rec["epoch"], "spec": self.bneck.spec(), "val": rec}
            ck.write_checkpoint(self.folder / BEST_DIR, {BEST_JSON: best}, {ck.MODEL_FILE: weights})


def _run_stages(stages: list[_Stage], stop_after_epochs: int | None = None) -> dict[str, list[dict]]:
    """The stages as phases of ``train.run_schedule``, the one training loop: finished epochs are skipped (each
    stage's ``state/`` records its own), an interrupted stage resumes from its last complete epoch, a stage is set
    up when its first epoch in this call comes. Returns each stage's history."""
    from .train import run_schedule

    done = [s.done() for s in stages]
    start, history, wall = 0, [], 0.0
    for s, hist in zip(stages, done):
        start += len(hist)
        history += hist
        wall += hist[-1]["wall_s"] if hist else 0.0
        if len(hist) < s.epochs:
            break
    total = sum(s.epochs for s in stages)
    end = total if stop_after_epochs is None else min(total, start + stop_after_epochs)
    current: list[int] = []

    def run_epoch(i: int, phase_epoch: int, epoch: int) -> dict:
        if current != [i]:
            stages[i].start()
            current[:] = [i]
        return stages[i].epoch(phase_epoch)

    def save(epochs_done: int, hist: list[dict], wall_s: float) -> None:
        s = stages[current[0]]
        s.save([h for h in hist if h["phase"] == s.name], wall_s)

    run_schedule(stages, start, end, history, wall, run_epoch, save)
    return {s.name: [h for h in history if h["phase"] == s.name] for s in stages}


def train_bottleneck(init: str, run_dir, bcfg: BottleneckConfig, data_dir=None, cache_dir=None,
                     stop_after_epochs: int | None = None) -> dict:
    """Train a bottleneck + the cloud half of checkpoint ``init`` (edge and exits frozen): one stage, a phase of
    ``train.run_schedule``, resumable from ``run_dir``. Writes ``state/`` (every epoch) and ``best/`` (the best
    validation accuracy of the offloaded samples), each a safetensors file and its JSON. ``cache_dir`` (default
    ``run_dir``) holds the cached views; runs with the same init, seed and views share it. ``stop_after_epochs``
    stops early (the same call later finishes the stage)."""
    run = Path(run_dir)
    stage = _Stage("bottleneck", init, run, bcfg, Path(cache_dir) if cache_dir else run, data_dir)
    return {"history": _run_stages([stage], stop_after_epochs)["bottleneck"]}


# ---------------------------------------------------------------------------------------------- recipes
CODEC_RUN = "codec_run.json"  # a train-codec run folder: the checkpoint and cache folder it was run with
RECIPE_COPY = "recipe.toml"  # ... and the recipe it runs, copied


def _views_dir(root: Path, bcfg: BottleneckConfig) -> Path:
    """A train-codec stage's cached views: one folder per training subset and seed under ``root``, so stages on the
    same images share their views (view v of a subset and seed is the same for every stage) and others never meet."""
    subset = "all" if bcfg.limit_train is None else f"first{bcfg.limit_train}"
    return root / f"{subset}-seed{bcfg.seed}"


def _check_init(init: str, stages: dict) -> None:
    """Refuse, before any data is read, a recipe whose bottleneck the checkpoint cannot carry."""
    from ..model.checkpoint import load_model
    from ..model.resnet import edge_feature_shape

    model, meta = load_model(init)
    channels = edge_feature_shape(model.cfg)[0]
    if stages["stage1"].code_channels > channels:
        raise ConfigError(f"code_channels = {stages['stage1'].code_channels}: {init} sends {channels} channels; "
                          f"give at most {channels} in [stage1]")
    if meta["policy"] is None:
        raise ConfigError(f"{init} has no exit policy: calibrate it first (hybridexit calibrate)")


def train_codec(init: str, recipe_path, run_dir, data_dir=None, cache_dir=None,
                stop_after_epochs: int | None = None) -> dict:
    """Run a codec recipe (``codec_recipe.read_codec_recipe``) on checkpoint ``init``: its stages are the phases of
    one schedule of ``train.run_schedule``, stage 1 in ``run_dir/stage1``, stage 2 (from stage 1's best epoch,
    ``stage1/best``) in ``run_dir/stage2``. Resumable: the same call skips finished epochs and continues an
    interrupted stage from its last complete one (``stop_after_epochs`` stops early). The recipe is copied to
    ``run_dir/recipe.toml``; a run folder of another recipe or checkpoint is refused. Cached views go to
    ``cache_dir`` (default ``run_dir/views``), one sub-folder per training subset and seed. Returns ``{stage:
    history}``."""
    import shutil

    from .codec_recipe import read_codec_recipe

    recipe = read_codec_recipe(recipe_path)
    init, run = os.path.normpath(init), Path(os.path.normpath(run_dir))
    _check_init(init, recipe)
    if (run / RECIPE_COPY).is_file() and read_codec_recipe(run / RECIPE_COPY) != recipe:
        raise ConfigError(f"{run} holds a run of another recipe ({run / RECIPE_COPY}): give that recipe, or "
                          f"choose another run folder")
    if (run / CODEC_RUN).is_file() and json.loads((run / CODEC_RUN).read_text())["init"] != init:
        raise ConfigError(f"{run} holds a run on another checkpoint ({run / CODEC_RUN}): choose another run folder")
    run.mkdir(parents=True, exist_ok=True)
    if not (run / RECIPE_COPY).is_file():
        shutil.copyfile(recipe_path, run / RECIPE_COPY)
    (run / CODEC_RUN).write_text(json.dumps({"init": init, "cache_dir": None if cache_dir is None else str(cache_dir)},
                                            indent=2) + "\n")
    root = Path(cache_dir) if cache_dir else run / "views"
    stages, prev = [], None
    for name, bcfg in recipe.items():
        if prev is not None:
            bcfg = replace(bcfg, init_from=str(run / prev / BEST_DIR))
        stages.append(_Stage(name, init, run / name, bcfg, _views_dir(root, bcfg), data_dir))
        prev = name
    return _run_stages(stages, stop_after_epochs)


def _weighted_mean(per_sample: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return per_sample.mean() if w is None else (per_sample * w).sum() / w.sum()


def _match_loss(bneck, cloud0, tuned, f, k: int, w: torch.Tensor | None = None):
    """MSE between the tuned first k cloud blocks on the bottleneck's output and the original's on ``f``,
    relative to the target's mean square; ``w``: per-sample weights (None: all 1)."""
    with torch.no_grad():
        t = f
        for block in cloud0.blocks[:k]:
            t = block(t)
    h = bneck(f)
    for block in tuned:
        h = block(h)
    return _weighted_mean((h - t).pow(2).flatten(1).mean(1), w) / t.pow(2).mean()


def _kd_loss(out, tl, y, bcfg: BottleneckConfig, w: torch.Tensor | None = None):
    T = bcfg.kd_temperature
    kd = F.kl_div(F.log_softmax(out / T, 1), F.log_softmax(tl / T, 1), reduction="none", log_target=True).sum(1) * T**2
    ce = F.cross_entropy(out, y, reduction="none")
    return _weighted_mean(bcfg.kd_alpha * kd + (1 - bcfg.kd_alpha) * ce, w)


def _offloaded(edge, split, policy) -> torch.Tensor:
    """Which samples of ``split`` the frozen edge sends to the cloud under its exit policy."""
    from ..model.hybrid import CLOUD

    if policy is None:
        raise ConfigError("the checkpoint has no exit policy: calibrate it first (hybridexit calibrate)")
    out = []
    with torch.no_grad():
        for i in range(0, len(split), 500):
            r = edge.decide(split.images[i:i + 500], policy.thresholds, policy.temperatures or None)
            out.append(r.decided_at == CLOUD)
    return torch.cat(out)


def export_codec(run_dir, out_dir, cache_dir=None, tables_from: int = 20000) -> dict:
    """The learned codec (``codec.json``, ``codec.safetensors``) of a bottleneck run's best epoch (``best/``), whose
    coder tables are estimated on the symbols of the first ``tables_from`` images of the cached training view
    (``cache_dir``, default the run's folder: training split). Where it goes:

    - the run fine-tuned the cloud half: a new codec checkpoint ``out_dir`` (it must not exist), the init checkpoint's
      files with its cloud half replaced by the fine-tuned one (the edge and exit tensors are checked bit-identical)
      and the codec beside them; its cloud half reads only this codec;
    - the cloud half is the init's, bit for bit (``tune_cloud = false``): the codec goes into ``out_dir/codec/``,
      ``out_dir`` being the init checkpoint itself (or a copy: the same model fingerprint; copied from the init when
      it does not exist). The checkpoint's own files stay as they are: one folder carries the model and its codec,
      and every other codec still works.

    ``run_dir``: a ``train_bottleneck`` run, a ``train_codec`` run (its recipe's last stage, which must be finished)
    or one stage of it; ``cache_dir``: the one the run was trained with (a ``train_codec`` run recorded its own)."""
    import shutil

    from safetensors.torch import load_file, save_file

    run, views, codec_run = _export_source(Path(run_dir), cache_dir)
    out = Path(out_dir)
    cfg = json.loads((run / "config.json").read_text())
    init, bcfg = cfg["init"], BottleneckConfig(**cfg["bottleneck"])
    best = read_best(run / BEST_DIR)
    if not (views / "view0.f16").is_file():
        raise ConfigError(f"no cached training view {views / 'view0.f16'}: give the cache folder {run} was trained with")
    from ..model.checkpoint import load_model

    net_cfg = load_model(init)[0].cfg
    if _cloud_unchanged(init, best["cloud"], net_cfg.edge_blocks):
        return _export_codec_only(run, init, out, best, bcfg, views, codec_run, net_cfg, tables_from)
    if out.exists():
        raise ConfigError(f"{out} exists: {run} fine-tuned the cloud half, so it exports as a new codec checkpoint; "
                          f"give a folder that does not exist (only a codec trained with tune_cloud = false goes into "
                          f"an existing checkpoint's codec/ folder)")
    shutil.copytree(init, out)
    eb = net_cfg.edge_blocks
    old = load_file(str(Path(init) / "model.safetensors"))
    new = dict(old)
    for k, v in best["cloud"].items():  # CloudNet keys: blocks.j (= block eb + j of the whole network), head.*
        if k.startswith("blocks."):
            j, rest = k[len("blocks."):].split(".", 1)
            k = f"blocks.{eb + int(j)}.{rest}"
        if k not in old or old[k].shape != v.shape:
            raise ConfigError(f"fine-tuned cloud tensor {k} does not fit {init}")
        new[k] = v.detach().clone().contiguous()
    edge_keys = [k for k in old if not (k.startswith("head.") or (k.startswith("blocks.") and int(k.split(".")[1]) >= eb))]
    if not all(torch.equal(old[k], new[k]) for k in edge_keys):
        raise ConfigError("edge or exit tensors changed: the exits' thresholds would no longer be valid")
    save_file(new, str(out / "model.safetensors"))
    extra = _write_codec(out, run, init, best, bcfg, views, codec_run, net_cfg, tables_from,
                         {"edge_and_exits_bit_identical": True, "edge_tensors_checked": len(edge_keys)})
    return extra


def _cloud_unchanged(init: str, cloud: dict, edge_blocks: int) -> bool:
    """Whether a run's cloud half (CloudNet keys) is the init checkpoint's, bit for bit."""
    from safetensors.torch import load_file

    old = load_file(str(Path(init) / "model.safetensors"))
    for k, v in cloud.items():
        if k.startswith("blocks."):
            j, rest = k[len("blocks."):].split(".", 1)
            k = f"blocks.{edge_blocks + int(j)}.{rest}"
        if k not in old or not torch.equal(old[k], v):
            return False
    return True


def _export_codec_only(run: Path, init: str, out: Path, best: dict, bcfg, views: Path, codec_run, net_cfg,
                       tables_from: int) -> dict:
    """``export_codec`` of a run that left the cloud half as it was: the codec into ``out``'s ``codec/`` folder
    (``out`` copied from the init when it does not exist)."""
    import shutil

    from ..codecs import CODEC_DIR, CODEC_FILE
    from ..model.checkpoint import fingerprint

    if not out.exists():
        shutil.copytree(init, out)
    elif not (out / "model.safetensors").is_file() or fingerprint(out) != fingerprint(init):
        raise ConfigError(f"{out} is not {init} (another model fingerprint): give that checkpoint, or a new folder "
                          f"to copy it to")
    if (out / CODEC_FILE).is_file() or (out / CODEC_DIR).exists():
        raise ConfigError(f"{out} already carries a learned codec ({out / CODEC_DIR}): remove it first, or give "
                          f"another folder")
    tmp = out / (CODEC_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    facts = {"cloud": "the checkpoint's own, unchanged (tune_cloud = false): its model.safetensors reads this "
                      "codec's output and every other codec's"}
    extra = _write_codec(tmp, run, init, best, bcfg, views, codec_run, net_cfg, tables_from, facts)
    tmp.rename(out / CODEC_DIR)
    return extra


def _write_codec(dest: Path, run: Path, init: str, best: dict, bcfg, views: Path, codec_run, net_cfg,
                 tables_from: int, facts: dict) -> dict:
    """Write the codec of ``best`` (tables from the cached training view), its recipe and log into ``dest``."""
    import shutil

    from ..codecs import ContextCoder, write_learned_codec
    from ..model.resnet import edge_feature_shape

    b = Bottleneck(**best["spec"])
    b.load_state_dict(best["bottleneck"])
    b.eval()
    feats = np.load(views / "view0.f16", mmap_mode="r")
    sym = torch.cat([b.symbols(torch.from_numpy(feats[i:i + 1000].astype(np.float32)))
                     for i in range(0, min(tables_from, len(feats)), 1000)])
    probs = ContextCoder.estimate(sym, b.levels)
    extra = {"trained": {"run": str(run), "init": init, "config": asdict(bcfg), "chosen_epoch": best["epoch"],
                         "val_at_choice": best["val"], "tables_from_train_samples": int(len(sym)), **facts}}
    dest.mkdir(parents=True, exist_ok=True)
    if codec_run is not None:  # the recipe it was run from travels with the codec
        extra["trained"].update({"codec_run": str(codec_run), "stage": run.name,
                                 "recipe": (codec_run / RECIPE_COPY).read_text()})
        shutil.copy(codec_run / RECIPE_COPY, dest / "codec_recipe.toml")
    write_learned_codec(dest, b, probs, edge_feature_shape(net_cfg), extra)
    if (run / "log.jsonl").exists():
        shutil.copy(run / "log.jsonl", dest / "codec_log.jsonl")
    return extra


def _is_bottleneck_run(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "bottleneck" in cfg and "init" in cfg

def _export_source(path: Path, cache_dir) -> tuple[Path, Path, Path | None]:
    """(stage folder, folder of its cached views, the train-codec run it belongs to or None) of what
    ``export_codec`` was given: a train-codec run (its recipe's last stage, which must be finished), one stage
    of it, or a ``train_bottleneck`` run."""
    from .codec_recipe import read_codec_recipe

    if (path / CODEC_RUN).is_file():
        stages = read_codec_recipe(path / RECIPE_COPY)
        last = list(stages)[-1]
        stage, codec_run, st = path / last, path, _stage_state(path / last)
        done = 0 if st is None else st["epoch"]
        if done < stages[last].epochs:
            raise ConfigError(f"{stage} is not finished ({done} of {stages[last].epochs} epochs): run the same "
                              f"train-codec command again to finish it, or export one stage folder ({path / 'stage1'})")
    elif _is_bottleneck_run(path):
        stage = path
        codec_run = path.parent if (path.parent / CODEC_RUN).is_file() else None
    else:
        raise ConfigError(f"{path} is not a codec run: give a train-codec run folder or one of its stage folders")
    if codec_run is None:
        return stage, Path(cache_dir) if cache_dir else stage, None
    recorded = json.loads((codec_run / CODEC_RUN).read_text())["cache_dir"]
    bcfg = BottleneckConfig(**json.loads((stage / "config.json").read_text())["bottleneck"])
    return stage, _views_dir(Path(cache_dir or recorded or codec_run / "views"), bcfg), codec_run
