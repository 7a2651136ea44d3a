"""Training recipes as data: one TOML file per recipe (``recipes/*.toml``), nanoGPT-style.

A recipe is a flat table of ``TrainConfig`` fields plus an optional ``description``; what it leaves out keeps the
library default. ``load_recipe`` validates every key against ``TrainConfig`` so a typo is an error, not a silent
default. Command-line options given explicitly override the recipe (see ``cli.cmd_train``).

A recipe may also set the network's recipe options (``NETWORK_KEYS``: exit head capacity, the binary-edge options
of docs/recipes.md); ``read_recipe`` returns them apart. ``load_recipe`` (the training options alone) refuses a
recipe that sets them, so that a command building its network by itself (the sweep) cannot silently drop them.
So does a recipe's data options (``DATA_KEYS``: the image size of a class-folder dataset and given normalization
statistics), which ``recipe_data`` returns and only ``hybridexit train`` applies.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError

META_KEYS = ("description",)
NETWORK_KEYS = ("exit_pool", "exit_hidden", "act_shift", "rprelu", "ste")  # HybridConfig fields a recipe may set
DATA_KEYS = ("image_size", "mean", "std")  # data.load_dataset options a recipe may set


def recipe_fields() -> dict[str, dataclasses.Field]:
    from .train import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_recipe(path) -> dict:
    """The ``TrainConfig`` keyword arguments a recipe file sets (``description`` and other meta keys dropped);
    a recipe that also sets network options is refused (use ``read_recipe``)."""
    train, network = read_recipe(path)
    data = recipe_data(path)
    if network or data:
        what = " and ".join(f"{kind} options {sorted(keys)}" for kind, keys in (("network", network), ("data", data))
                            if keys)
        raise ConfigError(f"recipe {path} sets {what}, which this command does not apply (it builds the network "
                          f"itself): train it with `hybridexit train --recipe {path}`")
    return train


def recipe_data(path) -> dict:
    """The data options (``DATA_KEYS``) a recipe file sets: ``image_size`` (an int), ``mean`` and ``std`` (one
    number per channel each, both or neither)."""
    data = {k: v for k, v in read_toml(path, "recipe", "recipes/paper-xnor.toml").items() if k in DATA_KEYS}
    size = data.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        raise ConfigError(f"recipe {path}: image_size={size!r} must be an integer >= 8")
    for k in ("mean", "std"):
        v = data.get(k)
        if v is not None and not (isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)):
            raise ConfigError(f"recipe {path}: {k} must be a list of numbers, one per channel, e.g. [0.5, 0.5, 0.5]")
    if ("mean" in data) != ("std" in data):
        raise ConfigError(f"recipe {path}: give both mean and std, or neither")
    return data


def read_toml(path, what: str, example: str) -> dict:
    """A TOML data file (a recipe, a sweep) as a dict; a missing or malformed file is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found: give a TOML file such as {example}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: not valid TOML ({e})") from None


def read_recipe(path) -> tuple[dict, dict]:
    """(``TrainConfig`` keyword arguments, ``HybridConfig`` options of ``NETWORK_KEYS``) a recipe file sets."""
    data = read_toml(path, "recipe", "recipes/paper-xnor.toml")
    fields = recipe_fields()
    if isinstance(data.get("stage1"), dict):  # codec_recipe's format
        raise ConfigError(f"{path} is a codec recipe ([stage1]): run it with `hybridexit train-codec CHECKPOINT "
                          f"--recipe {path} --out RUN`")
    unknown = sorted(set(data) - set(fields) - set(META_KEYS) - set(NETWORK_KEYS) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"recipe {path}: unknown keys {unknown}; known: {sorted([*fields, *NETWORK_KEYS, *DATA_KEYS])}")
    out, network = {}, {}
    for k, v in data.items():
        if k in META_KEYS or k in DATA_KEYS:
            continue
        if isinstance(v, dict):
            raise ConfigError(f"recipe {path}: key {k!r} is a table; a recipe is a flat list of training options")
        (network if k in NETWORK_KEYS else out)[k] = tuple(v) if isinstance(v, list) else v
    return out, network
