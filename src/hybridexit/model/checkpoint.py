"""Checkpoints: a directory with ``model.safetensors`` and ``config.json`` (network, training recipe, dataset),
enough to rebuild and evaluate the model with no other flags. Training state (optimizer buffers, RNG, step) sits
beside it in ``train_state.safetensors`` / ``train_state.json``. Nothing here unpickles.

Writes are atomic at directory level: every file is written into ``NAME.tmp/``, then ``NAME`` is swapped for it,
so an interruption leaves either the previous complete checkpoint or the new one (``NAME.old`` is restored).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .resnet import HybridConfig

FORMAT = 1
MODEL_FILE, CONFIG_FILE, STATE_FILE, STATE_JSON, LOG_FILE, VAL_FILE = (
    "model.safetensors", "config.json", "train_state.safetensors", "train_state.json", "log.jsonl",
    "val_split.safetensors")


def _recover(path: Path) -> None:
    """Writers only: an interrupted swap left NAME.old and no NAME; put it back before writing."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)


def _readable(path: Path) -> Path:
    """Readers never rename (a writer may be between its two renames): NAME, or NAME.old while NAME is absent."""
    old = path.with_name(path.name + ".old")
    return old if not path.exists() and old.exists() else path


def write_checkpoint(path, files: dict[str, bytes | dict | None], tensors: dict[str, dict[str, torch.Tensor]]):
    """Atomically write a checkpoint directory. ``files``: name -> JSON-able dict or raw bytes;
    ``tensors``: name -> tensor dict saved as safetensors. Existing files not named are carried over."""
    path = Path(path)
    _recover(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    if path.exists():
        shutil.copytree(path, tmp)
    else:
        tmp.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, (bytes, bytearray)):
            (tmp / name).write_bytes(content)
        else:
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    for name, tdict in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tdict.items()}, str(tmp / name))
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_config(path) -> dict:
    path = Path(path)
    cfg_file = _readable(path) / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {CONFIG_FILE} is missing")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("network"), dict):
        raise CheckpointError(f"{cfg_file}: not a hybridexit checkpoint config (format {FORMAT} expected)")
    return cfg


def read_tensors(path, name=MODEL_FILE) -> dict[str, torch.Tensor]:
    f = _readable(Path(path)) / name
    if not f.is_file():
        raise CheckpointError(f"{f} is missing")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own SafetensorError (not exported)
        raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None


def read_val_ids(path):
    """The checkpoint's record of its validation samples by content (``data.image_ids`` with labels), or None."""
    f = _readable(Path(path)) / VAL_FILE
    return read_tensors(path, VAL_FILE)["val_ids"] if f.is_file() else None


def dataset_record(path) -> dict:
    """The checkpoint's record of its data (config.json's ``data``: ``data.Dataset.record()`` with the hold-out's
    size and seed; CIFAR records written before class folders existed have no ``kind``); {} when it has none."""
    return read_config(path).get("data") or {}


def load_data(path, data_dir=None):
    """The data the checkpoint was trained on, read with its recorded preprocessing (image size, class order,
    statistics): what calibrate, evaluate, serve and edge read. ``data_dir``: where this copy is (default: CIFAR's
    usual places, or the class-folder tree recorded at training)."""
    from ..data.datasets import load_recorded

    return load_recorded(dataset_record(path), data_dir)


def validation_split(path, ds):
    """The checkpoint's own validation split (never the test split), found by content in this copy of the data."""
    return split_of(path, ds, "val")


def split_of(path, ds, name: str):
    """``test``, or the checkpoint's own ``val`` / ``train`` split, found by content (refused without the record)."""
    from ..data.datasets import get_split

    if name == "test":
        return ds.test
    ids = read_val_ids(path)
    if ids is None:
        raise CheckpointError(f"{path} has no record of its validation images ({VAL_FILE}): it cannot be calibrated "
                              f"or evaluated on 'val' without risking images it trained on")
    return get_split(ds, name, val_ids=ids)


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, allow_missing=()) -> None:
    """Load a state dict, refusing with the differences listed when it does not fit."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not any(k.startswith(p) for p in allow_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"shape mismatch ({'; '.join(shapes[:3])})")
        raise CheckpointError(f"{what} does not fit the requested architecture: {', '.join(parts)}")
    module.load_state_dict(state, strict=False)


def network_config(meta: dict) -> HybridConfig:
    """The network of a checkpoint config (older configs migrate: thresholds dropped, mean/std from the data)."""
    return HybridConfig.from_dict(meta["network"], meta.get("data"))


def load_model(path, cfg_override: HybridConfig | None = None):
    """Rebuild the HybridNet of a checkpoint (in eval mode). Returns (model, full config dict); the config's
    ``policy`` is the checkpoint's exit policy (``policy.ExitPolicy``) or None when it was never calibrated."""
    from .hybrid import HybridNet
    from .policy import read_policy

    meta = read_config(path)
    cfg = cfg_override or network_config(meta)
    model = HybridNet(cfg)
    load_state_strict(model, read_tensors(path), f"checkpoint {path}")
    meta = dict(meta, policy=read_policy(path))
    return model.eval(), meta


def save_model(path, model, meta: dict) -> None:
    """Write a model with ``meta`` (as ``load_model`` returns it: its exit policy, if any, is written too)."""
    from .policy import write_policy

    policy = meta.get("policy")
    meta = {k: v for k, v in meta.items() if k != "policy"}
    write_checkpoint(path, {CONFIG_FILE: dict(meta, format=FORMAT, network=model.cfg.to_dict())},
                     {MODEL_FILE: model.state_dict()})
    if policy is not None:
        write_policy(path, policy)


def fingerprint(path) -> str:
    """Hash of a checkpoint's network config and weights: edge and cloud must share it. The exit policy is not
    part of it (it lives in its own file): recalibrating does not change the model."""
    import hashlib

    net = network_config(read_config(path)).to_dict()
    h = hashlib.sha256(json.dumps(net, sort_keys=True).encode())
    h.update((_readable(Path(path)) / MODEL_FILE).read_bytes())
    return h.hexdigest()[:16]
