"""Training recipes as data: one TOML file per recipe (``recipes/*.toml``), nanoGPT-style.

A recipe is a flat table of ``TrainConfig`` fields plus an optional ``description``; what it leaves out keeps the
library default. ``load_recipe`` validates every key against ``TrainConfig`` so a typo is an error, not a silent
default. Command-line options given explicitly override the recipe (see ``cli.cmd_train``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ConfigError

META_KEYS = ("description",)


def recipe_fields() -> dict[str, dataclasses.Field]:
    from .train import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_recipe(path) -> dict:
    """The ``TrainConfig`` keyword arguments a recipe file sets (``description`` and other meta keys dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found: give a TOML file such as recipes/paper-xnor.toml")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path}: not valid TOML ({e})") from None
    fields = recipe_fields()
    unknown = sorted(set(data) - set(fields) - set(META_KEYS))
    if unknown:
        raise ConfigError(f"recipe {path}: unknown keys {unknown}; known: {sorted(fields)}")
    out = {}
    for k, v in data.items():
        if k in META_KEYS:
            continue
        if isinstance(v, dict):
            raise ConfigError(f"recipe {path}: key {k!r} is a table; a recipe is a flat list of training options")
        out[k] = tuple(v) if isinstance(v, list) else v
    return out
