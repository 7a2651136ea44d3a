"""Learned-codec recipes as data: one TOML file per codec (``recipes/codec-*.toml``), run by ``hybridexit
train-codec`` (``train_codec.train_codec``: each stage a phase of the one training loop).

A recipe holds a table ``[stage1]`` and optionally ``[stage2]``, plus an optional top-level ``description``. Each
table sets ``BottleneckConfig`` fields; what it leaves out keeps the library default (stage 2 does not inherit
stage 1's other settings). Stage 2 starts from stage 1's best epoch (``stage1/best``) and keeps its bottleneck, so
it inherits ``code_channels`` and ``bits``: a stage 2 that names other values is refused. ``init_from`` is the
driver's, never the recipe's. A typo, a wrong type or a value out of range is a one-line ``ConfigError`` that says
what to fix.
"""

from __future__ import annotations

import math
import typing
from dataclasses import fields, replace

from ..codecs.bottleneck_net import GAUSS_STEP, BottleneckConfig
from ..errors import ConfigError
from .recipes import META_KEYS, read_toml

STAGES = ("stage1", "stage2")
INHERITED = ("code_channels", "bits")  # stage 2 keeps stage 1's bottleneck
DRIVER_KEYS = ("init_from",)  # set by train_codec: stage 2 starts from stage 1's best epoch
EXAMPLE = "recipes/codec-c16b2.toml"

# (lowest, highest) allowed; None: unbounded on that side. Floats must also be finite; lr-like values > 0.
_RANGES = {"code_channels": (1, None), "bits": (min(GAUSS_STEP), max(GAUSS_STEP)), "epochs": (1, None),
           "views": (1, None), "match_blocks": (0, None), "batch_size": (1, None), "seed": (0, None),
           "limit_train": (1, None), "weight_decay": (0.0, None), "kd_alpha": (0.0, 1.0)}
_POSITIVE = ("lr", "cloud_lr", "kd_temperature", "offload_weight")


def stage_keys() -> dict[str, type]:
    """The keys a stage table may set, with their type (int or float)."""
    hints = typing.get_type_hints(BottleneckConfig)
    out = {}
    for f in fields(BottleneckConfig):
        if f.name in DRIVER_KEYS:
            continue
        kinds = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None)]
        out[f.name] = kinds[0]
    return out


def _value(path, stage: str, key: str, v, kind: type):
    where = f"codec recipe {path} [{stage}] {key} = {v!r}"
    if kind is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: give true or false")
        return v
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ConfigError(f"{where}: give a whole number")
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: give a number")
        v = float(v)
        if not math.isfinite(v):
            raise ConfigError(f"{where}: give a finite number")
    lo, hi = _RANGES.get(key, (None, None))
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        allowed = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{where}: out of range, give {allowed}")
    if key in _POSITIVE and v <= 0:
        raise ConfigError(f"{where}: give a number > 0")
    return v


def _stage(path, stage: str, table) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"codec recipe {path}: {stage} must be a table ([{stage}] followed by its keys)")
    known = stage_keys()
    for k in table:
        if k in DRIVER_KEYS:
            raise ConfigError(f"codec recipe {path} [{stage}]: remove {k}; train-codec sets it (stage 2 starts "
                              f"from stage 1's best epoch)")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"codec recipe {path} [{stage}]: unknown keys {unknown}; known: {sorted(known)}")
    return {k: _value(path, stage, k, v, known[k]) for k, v in table.items()}


def read_codec_recipe(path) -> dict[str, BottleneckConfig]:
    """``{"stage1": BottleneckConfig, ["stage2": BottleneckConfig]}`` of a codec recipe file, in order. Stage 2's
    ``code_channels`` and ``bits`` are stage 1's; its ``init_from`` is left for the driver to set."""
    data = read_toml(path, "codec recipe", EXAMPLE)
    unknown = sorted(set(data) - set(STAGES) - set(META_KEYS))
    if unknown:
        raise ConfigError(f"codec recipe {path}: unknown keys {unknown}; a codec recipe holds [stage1], optionally "
                          f"[stage2], and a description")
    if "stage1" not in data:
        raise ConfigError(f"codec recipe {path}: no [stage1] table; see {EXAMPLE}")
    if not isinstance(data.get("description", ""), str):
        raise ConfigError(f"codec recipe {path}: description must be a string")
    s1 = _stage(path, "stage1", data["stage1"])
    out = {"stage1": _config(path, "stage1", s1)}
    if "stage2" in data:
        s2 = _stage(path, "stage2", data["stage2"])
        first = out["stage1"]
        for k in INHERITED:
            if k in s2 and s2[k] != getattr(first, k):
                raise ConfigError(f"codec recipe {path} [stage2] {k} = {s2[k]}: stage 2 keeps stage 1's bottleneck "
                                  f"({k} = {getattr(first, k)}); remove {k} from [stage2]")
        if first.refine and s2.get("refine") is False:
            raise ConfigError(f"codec recipe {path} [stage2] refine = false: stage 1's bottleneck has the 3x3 "
                              f"refinement, stage 2 keeps it; remove refine from [stage2]")
        out["stage2"] = replace(_config(path, "stage2", s2), **{k: getattr(first, k) for k in INHERITED},
                                refine=first.refine or s2.get("refine", False))
    return out


def _config(path, stage: str, kw: dict) -> BottleneckConfig:
    try:
        return BottleneckConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"codec recipe {path} [{stage}]: {e}") from None
