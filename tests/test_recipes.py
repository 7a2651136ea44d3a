import dataclasses
from pathlib import Path

import pytest

from hybridexit import ConfigError, HybridConfig
from hybridexit.cli.main import _train_config, build_parser
from hybridexit.workflows.recipes import load_recipe, read_recipe, recipe_fields
from hybridexit.workflows.train import TrainConfig

RECIPES = sorted(p for p in [*(Path(__file__).parents[1] / "recipes").glob("*.toml"),
                             *(Path(__file__).parents[1] / "recipes").glob("screen-*/*.toml")]
                 if not p.name.startswith("codec-"))
CODEC_RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("codec-*.toml"))  # tests/test_codec_recipe.py


def _write(path, text):
    path.write_text(text)
    return path


def test_every_committed_recipe_is_a_valid_training_config():
    assert RECIPES
    for path in RECIPES:  # --init comes from the command line (a cloud recipe needs one)
        train, network = read_recipe(path)  # network options (docs/recipes.md) on a binary edge with an exit
        TrainConfig(**{"init": "checkpoints/some-hybrid", **train})
        HybridConfig(depth=32, edge_layers=20, edge_bits=1, exits=(20,), **network)


def test_a_codec_recipe_is_not_a_training_recipe():
    assert CODEC_RECIPES
    with pytest.raises(ConfigError, match="train-codec"):
        read_recipe(CODEC_RECIPES[0])


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate"):
        load_recipe(_write(tmp_path / "r.toml", "learning_rate = 0.1\n"))


def test_lists_become_tuples_and_description_is_not_an_option(tmp_path):
    kw = load_recipe(_write(tmp_path / "r.toml", 'description = "x"\nexit_weights = [0.2, 0.3, 0.5]\n'))
    assert kw == {"exit_weights": (0.2, 0.3, 0.5)}
    assert TrainConfig(**kw).exit_weights == (0.2, 0.3, 0.5)


@pytest.mark.parametrize("line,msg", [("lr = -1", "lr=-1"), ("momentum = 1.5", "momentum"),
                                      ("kd_temperature = 0", "kd_temperature"), ("weight_decay = -0.1", "weight_decay")])
def test_out_of_range_recipe_values_are_refused_like_flags(tmp_path, line, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**load_recipe(_write(tmp_path / "r.toml", line + "\n")))


def _train_args(tmp_path, *argv):
    return build_parser().parse_args(["train", "--out", str(tmp_path / "out"), *argv])


def test_command_line_overrides_the_recipe_which_overrides_the_defaults(tmp_path):
    r = _write(tmp_path / "r.toml", "lr = 0.02\nmomentum = 0.8\ncompile = true\nexit_weights = [0.5, 0.5]\n")
    cfg = _train_config(_train_args(tmp_path, "--recipe", str(r), "--lr", "0.3", "--no-compile"))
    assert (cfg.lr, cfg.momentum, cfg.compile, cfg.exit_weights) == (0.3, 0.8, False, (0.5, 0.5))
    assert cfg.epochs == TrainConfig().epochs  # neither sets it: the library default
    assert _train_config(_train_args(tmp_path, "--exit-weights", "0.25", "0.75")).exit_weights == (0.25, 0.75)


def test_every_training_option_is_on_the_command_line_without_a_default_of_its_own(tmp_path, capsys):
    a = _train_args(tmp_path)
    assert all(getattr(a, name) is None for name in recipe_fields())  # the recipe's or TrainConfig's default applies
    assert _train_config(a) == TrainConfig()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):  # --help shows the library's default, read from TrainConfig
        if f.default not in ((), None):
            assert f"(default: {f.default})" in shown, f.name
