"""Codec recipes (``recipes/codec-*.toml``): two stages of ``BottleneckConfig`` fields, refused with a one-line
ConfigError when a key, a type or a value is wrong, or when stage 2 would change stage 1's bottleneck."""

from pathlib import Path

import pytest

from hybridexit.errors import ConfigError
from hybridexit.workflows.codec_recipe import read_codec_recipe
from hybridexit.workflows.train_codec import BottleneckConfig

CODEC_RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("codec-*.toml"))


def _write(tmp_path, text):
    path = tmp_path / "codec.toml"
    path.write_text(text)
    return path


def test_committed_codec_recipes_parse():
    assert CODEC_RECIPES
    for path in CODEC_RECIPES:
        stages = read_codec_recipe(path)
        assert list(stages)[0] == "stage1" and all(s.init_from is None for s in stages.values())
    c16 = read_codec_recipe(Path(__file__).parents[1] / "recipes" / "codec-c16b2.toml")
    s1, s2 = c16["stage1"], c16["stage2"]
    assert (s1.code_channels, s1.bits, s1.epochs, s1.match_blocks, s1.limit_train) == (16, 2, 4, 1, 20000)
    assert (s2.code_channels, s2.bits, s2.epochs, s2.views, s2.match_blocks) == (16, 2, 8, 4, 0)  # inherited c, b
    assert (s2.lr, s2.cloud_lr, s2.limit_train) == (0.0003, 0.0001, None)  # the rest is its own (or the default)


def test_one_stage_recipe_and_defaults(tmp_path):
    stages = read_codec_recipe(_write(tmp_path, 'description = "x"\n[stage1]\nbits = 3\nlr = 1\n'))
    assert list(stages) == ["stage1"]
    assert stages["stage1"] == BottleneckConfig(bits=3, lr=1.0)
    assert isinstance(stages["stage1"].lr, float)


def test_stage2_may_repeat_stage1s_bottleneck(tmp_path):
    stages = read_codec_recipe(_write(tmp_path, "[stage1]\ncode_channels = 8\n[stage2]\ncode_channels = 8\nepochs = 2\n"))
    assert (stages["stage2"].code_channels, stages["stage2"].bits, stages["stage2"].epochs) == (8, 2, 2)


def test_refine_is_a_switch_that_stage2_keeps_or_adds(tmp_path):
    added = read_codec_recipe(_write(tmp_path, "[stage1]\nepochs = 1\n[stage2]\nrefine = true\n"))
    assert (added["stage1"].refine, added["stage2"].refine) == (False, True)
    kept = read_codec_recipe(_write(tmp_path, "[stage1]\nrefine = true\n[stage2]\nepochs = 2\n"))
    assert kept["stage2"].refine
    refined = read_codec_recipe(Path(__file__).parents[1] / "recipes" / "codec-c16b2-refine.toml")
    assert refined["stage2"].refine and not refined["stage1"].refine
    frozen = read_codec_recipe(Path(__file__).parents[1] / "recipes" / "codec-headline-c12b3-frozen.toml")
    assert not any(st.tune_cloud for st in frozen.values()) and frozen["stage2"].offload_weight == 4.0
    assert added["stage1"].tune_cloud and added["stage1"].offload_weight == 1.0  # the defaults: as before


@pytest.mark.parametrize("text,fragment", [
    ("[stage1]\nrefine = 1\n", "refine = 1: give true or false"),
    ("[stage1]\nrefine = true\n[stage2]\nrefine = false\n", "stage 2 keeps it"),
    ("[stage1]\nlrr = 0.1\n", "unknown keys ['lrr']"),
    ("[stage1]\n[stage3]\nepochs = 1\n", "unknown keys ['stage3']"),
    ("epochs = 3\n[stage1]\n", "unknown keys ['epochs']"),
    ("[stage2]\nepochs = 1\n", "no [stage1]"),
    ("stage1 = 3\n", "must be a table"),
    ("[stage1]\nepochs = 'four'\n", "epochs = 'four': give a whole number"),
    ("[stage1]\nepochs = 2.5\n", "give a whole number"),
    ("[stage1]\nviews = true\n", "give a whole number"),
    ("[stage1]\nlr = 'fast'\n", "give a number"),
    ("[stage1]\nlr = nan\n", "finite"),
    ("[stage1]\nlr = 0\n", "give a number > 0"),
    ("[stage1]\noffload_weight = 0\n", "offload_weight = 0: give a number > 0"),
    ("[stage1]\ntune_cloud = 0\n", "tune_cloud = 0: give true or false"),
    ("[stage1]\nbits = 5\n", "bits = 5: out of range, give 1 to 4"),
    ("[stage1]\nepochs = 0\n", "epochs = 0: out of range"),
    ("[stage1]\nkd_alpha = 1.5\n", "kd_alpha"),
    ("[stage1]\nlimit_train = 0\n", "limit_train"),
    ("[stage1]\ninit_from = 'x/best.pt'\n", "train-codec sets it"),
    ("[stage1]\nbits = 2\n[stage2]\nbits = 4\n", "[stage2] bits = 4: stage 2 keeps stage 1's bottleneck (bits = 2)"),
    ("[stage1]\ncode_channels = 16\n[stage2]\ncode_channels = 8\n", "remove code_channels from [stage2]"),
    ("[stage1]\nepochs = 2\n[stage2]\nbogus = 1\n", "[stage2]: unknown keys ['bogus']"),
    ("[stage1\n", "not valid TOML"),
])
def test_bad_recipes_are_refused_in_one_line(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as e:
        read_codec_recipe(_write(tmp_path, text))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_codec_recipe(tmp_path / "nope.toml")
