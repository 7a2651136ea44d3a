"""The learned bottleneck: quantizer, PCA start, training with the edge frozen, export as a checkpoint with a codec;
a codec recipe run in two stages (train_codec, hybridexit train-codec / export-codec)."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hybridexit import codecs, errors
from hybridexit.cli import main
from hybridexit.workflows import evaluate
from hybridexit.workflows.train_codec import (
    Bottleneck,
    BottleneckConfig,
    export_codec,
    read_best,
    train_bottleneck,
    train_codec,
)


def test_symbols_are_what_the_forward_pass_quantizes():
    torch.manual_seed(0)
    b = Bottleneck(8, 3, 2).eval()
    f = torch.randn(4, 8, 5, 5) * 3
    sym = b.symbols(f)
    assert sym.dtype == torch.uint8 and int(sym.max()) < 4
    assert len(torch.unique(sym)) == 4  # every level is used on spread-out data
    torch.testing.assert_close(b.from_symbols(sym), b(f))


def test_rounding_passes_gradients_to_the_reduction_and_the_step():
    torch.manual_seed(0)
    b = Bottleneck(8, 3, 2).train()
    b(torch.randn(6, 8, 4, 4)).pow(2).sum().backward()
    assert b.reduce.weight.grad.abs().sum() > 0 and b.log_step.grad.abs().sum() > 0


def test_refinement_starts_as_the_plain_bottleneck_and_is_counted():
    torch.manual_seed(0)
    plain, refined = Bottleneck(8, 3, 2).eval(), Bottleneck(8, 3, 2, refine=True).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("enc.", "dec.")) for k in missing)
    f = torch.randn(4, 8, 5, 5) * 3
    torch.testing.assert_close(refined(f), plain(f))  # zero-initialized: the same function at the start
    assert torch.equal(refined.symbols(f), plain.symbols(f))
    with torch.no_grad():
        refined.enc.weight.normal_()
    assert not torch.equal(refined.symbols(f), plain.symbols(f))
    torch.testing.assert_close(refined.from_symbols(refined.symbols(f)), refined(f))
    assert refined.spec() == {**plain.spec(), "refine": True} and "refine" not in plain.spec()
    assert refined.edge_macs(5, 5) - plain.edge_macs(5, 5) == 9 * 8 * 8 * 25 == refined.cloud_macs(5, 5) - plain.cloud_macs(5, 5)


def test_pca_start_reconstructs_low_rank_features():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 8, generator=g)
    z = torch.randn(200, 3, 4, 4, generator=g)
    f = torch.einsum("nkhw,kc->nchw", z, basis) + 0.5
    b = Bottleneck(8, 3, 4)
    b.init_pca(f)
    b.eval()
    rel = (b(f) - f).pow(2).mean() / (f - f.mean()).pow(2).mean()
    assert rel < 0.05  # 4-bit codes of the 3 principal directions: only the quantization error is left


def test_bad_configs_are_refused():
    with pytest.raises(errors.ConfigError):
        Bottleneck(8, 9, 2)
    with pytest.raises(errors.ConfigError):
        Bottleneck(8, 2, 5)
    with pytest.raises(errors.ConfigError):
        BottleneckConfig(epochs=0)


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_cifar):
    from hybridexit.model.checkpoint import save_model
    from hybridexit.model.hybrid import HybridNet
    from hybridexit.model.policy import ExitPolicy, write_policy
    from hybridexit.model.resnet import HybridConfig

    torch.manual_seed(0)
    cfg = HybridConfig(depth=8, num_classes=10, edge_layers=4, edge_bits=1, exits=(4,))
    model = HybridNet(cfg).eval()
    path = tmp_path / "tiny"
    save_model(path, model, {"data": {"name": "cifar10", "mean": list(cfg.mean), "std": list(cfg.std),
                                      "classes": [f"class{i}" for i in range(10)], "val_size": 40, "split_seed": 0}})
    write_policy(path, ExitPolicy((1.5,)))
    return path


@pytest.mark.parametrize("refine", [False, True])
def test_training_keeps_the_edge_and_exports_a_working_codec(tiny_ckpt, tiny_cifar, tmp_path, refine):
    from hybridexit.data import get_split, load_cifar
    from hybridexit.model.checkpoint import load_model

    run = tmp_path / "run"
    bcfg = BottleneckConfig(code_channels=4, bits=2, epochs=2, batch_size=32, match_blocks=1, refine=refine)
    hist = train_bottleneck(str(tiny_ckpt), run, bcfg, data_dir=tiny_cifar)["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and (run / "best" / "best.json").is_file()
    assert not list(run.rglob("*.pt"))  # safetensors and JSON only: nothing pickled
    assert train_bottleneck(str(tiny_ckpt), run, bcfg, data_dir=tiny_cifar)["history"] == hist  # resumed: done
    out = tmp_path / "with-codec"
    export_codec(run, out)
    old, new = load_file(str(tiny_ckpt / "model.safetensors")), load_file(str(out / "model.safetensors"))
    edge = [k for k in old if not (k.startswith("head.") or (k.startswith("blocks.") and int(k.split(".")[1]) >= 2))]
    assert edge and all(torch.equal(old[k], new[k]) for k in edge)  # edge and exits bit-identical
    assert any(not torch.equal(old[k], new[k]) for k in old if k not in edge)  # the cloud half was trained
    assert codecs.required_codec(out) == "bn"
    model, meta = load_model(out)
    ds = load_cifar("cifar10", tiny_cifar)
    r = evaluate.evaluate_codec(model, get_split(ds, "val", 40, 0), meta["policy"].thresholds, codecs.get("bn", out), out)
    assert r["n"] == 40 and 0 < r["payload_bytes_per_offloaded"] < 4 * 16 * 16 * 2 / 8 + 64
    assert np.isfinite(r["accuracy"])
    with pytest.raises(errors.ConfigError):
        train_bottleneck(str(tiny_ckpt), run, BottleneckConfig(code_channels=5, epochs=2), data_dir=tiny_cifar)


# stage 2's learning rates are tiny, so its weights stay those it started from: stage 1's best
TWO_STAGES = """[stage1]
code_channels = 4
bits = 2
epochs = 1
batch_size = 32
limit_train = 64
[stage2]
epochs = 1
views = 2
match_blocks = 0
batch_size = 32
limit_train = 64
lr = 1e-9
cloud_lr = 1e-9
"""


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_codec_runs_both_stages_resumes_and_exports(tiny_ckpt, tiny_cifar, tmp_path, capsys):
    recipe, run = tmp_path / "codec.toml", tmp_path / "codec-run"
    recipe.write_text(TWO_STAGES)
    hist = train_codec(str(tiny_ckpt), recipe, run, data_dir=tiny_cifar)
    assert list(hist) == ["stage1", "stage2"] and [len(h) for h in hist.values()] == [1, 1]
    assert (run / "recipe.toml").read_text() == TWO_STAGES
    cfg2 = json.loads((run / "stage2" / "config.json").read_text())["bottleneck"]
    assert (cfg2["code_channels"], cfg2["bits"], cfg2["init_from"]) == (4, 2, str(run / "stage1" / "best"))
    # stage 2 started from stage 1's best: same validation accuracy at its start, same weights (tiny lr)
    best1, best2 = (read_best(run / s / "best") for s in ("stage1", "stage2"))
    start2 = next(r for r in _lines(run / "stage2" / "log.jsonl") if r.get("event") == "init")
    assert start2["from"] == cfg2["init_from"] and start2["val_offloaded_acc"] == best1["val"]["val_offloaded_acc"]
    for k in ("reduce.weight", "expand.weight", "log_step"):
        torch.testing.assert_close(best2["bottleneck"][k], best1["bottleneck"][k], atol=1e-6, rtol=0)
    # the stages share the cached view 0 (same images, same seed): stage 2 computed only view 1
    assert [r["view"] for r in _lines(run / "stage2" / "log.jsonl") if r.get("event") == "cached_view"] == [1]
    assert sorted(p.name for p in (run / "views" / "first64-seed0").glob("*.f16")) == ["view0.f16", "view1.f16"]

    logs = {s: (run / s / "log.jsonl").read_text() for s in ("stage1", "stage2")}
    assert train_codec(str(tiny_ckpt), recipe, run, data_dir=tiny_cifar) == hist  # finished: nothing retrained
    assert {s: (run / s / "log.jsonl").read_text() for s in logs} == logs
    shutil.rmtree(run / "stage2" / "state")  # as if stage 2 had been interrupted before its first epoch ended
    assert train_codec(str(tiny_ckpt), recipe, run, data_dir=tiny_cifar)["stage1"] == hist["stage1"]
    assert (run / "stage1" / "log.jsonl").read_text() == logs["stage1"]  # stage 1 skipped, stage 2 trained again
    assert len((run / "stage2" / "log.jsonl").read_text()) > len(logs["stage2"])
    recipe.write_text(TWO_STAGES.replace("epochs = 1\nbatch_size", "epochs = 2\nbatch_size", 1))
    with pytest.raises(errors.ConfigError, match="another recipe"):
        train_codec(str(tiny_ckpt), recipe, run, data_dir=tiny_cifar)

    out = tmp_path / "with-codec"  # the command exports the recipe's last stage
    assert main(["export-codec", str(run), "--out", str(out)]) == 0
    assert "epoch 1" in capsys.readouterr().out
    assert codecs.required_codec(out) == "bn" and (out / "codec_recipe.toml").read_text() == TWO_STAGES
    trained = json.loads((out / codecs.CODEC_FILE).read_text())["trained"]
    assert (trained["stage"], trained["run"], trained["tables_from_train_samples"]) == ("stage2", str(run / "stage2"), 64)
    export_codec(run / "stage1", tmp_path / "stage1-codec")  # one stage folder: its views are found too
    assert codecs.required_codec(tmp_path / "stage1-codec") == "bn"


RESUMED = """[stage1]
code_channels = 4
bits = 2
epochs = 2
batch_size = 32
limit_train = 64
[stage2]
epochs = 2
views = 2
match_blocks = 0
batch_size = 32
limit_train = 64
"""


def _untimed(hist):
    return {s: [{k: v for k, v in r.items() if k not in ("epoch_s", "wall_s")} for r in h] for s, h in hist.items()}


def test_an_interrupted_codec_run_resumes_to_the_uninterrupted_result(tiny_ckpt, tiny_cifar, tmp_path):
    """The stages are phases of train.py's one loop: a run stopped after any epoch (in a stage, at the boundary
    between the stages) and resumed by the same call ends with the weights, optimizer states, best epochs and logs
    of the run that was never stopped."""
    recipe = tmp_path / "codec.toml"
    recipe.write_text(RESUMED)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    want = train_codec(str(tiny_ckpt), recipe, whole, data_dir=tiny_cifar, cache_dir=tmp_path / "cache")
    assert [len(h) for h in want.values()] == [2, 2]
    first = train_codec(str(tiny_ckpt), recipe, parts, data_dir=tiny_cifar, cache_dir=tmp_path / "cache",
                        stop_after_epochs=1)  # stopped inside stage 1
    assert _untimed(first) == _untimed({"stage1": want["stage1"][:1], "stage2": []})
    for stop in (2, None):  # the stage 1 -> 2 boundary inside the call, then the rest
        got = train_codec(str(tiny_ckpt), recipe, parts, data_dir=tiny_cifar, cache_dir=tmp_path / "cache",
                          stop_after_epochs=stop)
    assert _untimed(got) == _untimed(want)
    for stage in ("stage1", "stage2"):
        for sub, name in (("state", "model.safetensors"), ("state", "train_state.safetensors"),
                          ("best", "model.safetensors")):
            a, b = load_file(str(whole / stage / sub / name)), load_file(str(parts / stage / sub / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (stage, sub, name)
        assert read_best(whole / stage / "best")["epoch"] == read_best(parts / stage / "best")["epoch"]
    w, p = (load_file(str(d / "stage2" / "state" / "model.safetensors")) for d in (whole, parts))
    s1 = load_file(str(whole / "stage1" / "best" / "model.safetensors"))
    assert any(not torch.equal(w[k], s1[k]) for k in w if k.startswith("bottleneck."))  # stage 2 did train


def test_train_codec_command_prints_each_stage_and_export_refuses_an_unfinished_run(tiny_ckpt, tiny_cifar, tmp_path,
                                                                                     capsys):
    recipe, run = tmp_path / "codec.toml", tmp_path / "run"
    recipe.write_text("[stage1]\ncode_channels = 2\nbits = 1\nepochs = 1\nbatch_size = 32\nlimit_train = 32\n")
    assert main(["train-codec", str(tiny_ckpt), "--recipe", str(recipe), "--out", str(run), "--data-dir",
                 str(tiny_cifar), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "stage1: 1 epochs, best validation accuracy of the offloaded samples" in out and "stage2" not in out
    assert (tmp_path / "cache" / "first32-seed0" / "view0.f16").is_file() and not (run / "views").exists()
    assert main(["export-codec", str(run), "--out", str(tmp_path / "ck")]) == 0  # the recorded cache folder
    assert codecs.required_codec(tmp_path / "ck") == "bn"
    capsys.readouterr()

    recipe.write_text(recipe.read_text() + "[stage2]\nepochs = 1\n")  # a run whose last stage never started
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("recipe.toml", "codec_run.json"):
        (bare / name).write_text((run / name).read_text() if name != "recipe.toml" else recipe.read_text())
    assert main(["export-codec", str(bare), "--out", str(tmp_path / "ck2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage2 is not finished (0 of 1 epochs)" in err
    assert not (tmp_path / "ck2").exists()


def test_a_cached_view_of_other_data_or_order_is_refused(tiny_ckpt, tiny_cifar, tmp_path):
    """Cached features line up with the labels by position: a view cached for another sample order (or data, or
    edge) would silently train the cloud on wrong labels, so it is refused."""
    import json

    cache = tmp_path / "cache"
    bcfg = BottleneckConfig(code_channels=4, bits=2, epochs=1, batch_size=32, match_blocks=1)
    train_bottleneck(str(tiny_ckpt), tmp_path / "a", bcfg, data_dir=tiny_cifar, cache_dir=cache)
    key = json.loads((cache / "view0.json").read_text())
    assert key["n"] > 0 and len(key["split_sha256"]) == 64 and len(key["model_sha256"]) == 64
    train_bottleneck(str(tiny_ckpt), tmp_path / "b", bcfg, data_dir=tiny_cifar, cache_dir=cache)  # same: reused
    (cache / "view0.json").write_text(json.dumps({**key, "split_sha256": "0" * 64}))
    with pytest.raises(errors.ConfigError, match="another checkpoint, data or sample order"):
        train_bottleneck(str(tiny_ckpt), tmp_path / "c", bcfg, data_dir=tiny_cifar, cache_dir=cache)
    (cache / "view0.json").unlink()  # a view without its record (cached before records existed) is refused too
    with pytest.raises(errors.ConfigError, match="remove"):
        train_bottleneck(str(tiny_ckpt), tmp_path / "d", bcfg, data_dir=tiny_cifar, cache_dir=cache)


def test_a_frozen_cloud_codec_goes_into_the_checkpoints_codec_folder(tiny_ckpt, tiny_cifar, tmp_path):
    """tune_cloud = false: only the bottleneck learns; export puts the codec into the checkpoint's codec/ folder and
    leaves its model as it was, so every codec still runs on it. offload_weight weighs the offloaded samples."""
    from hybridexit.model.checkpoint import fingerprint

    run = tmp_path / "run"
    bcfg = BottleneckConfig(code_channels=4, bits=2, epochs=1, batch_size=32, match_blocks=0, tune_cloud=False,
                            offload_weight=3.0, limit_train=64)
    train_bottleneck(str(tiny_ckpt), run, bcfg, data_dir=tiny_cifar)
    weights = [r for r in _lines(run / "log.jsonl") if r.get("event") == "offload_weights"]
    assert len(weights) == 1 and 0 <= weights[0]["offloaded"] <= 1
    before = (tiny_ckpt / "model.safetensors").read_bytes()
    fp = fingerprint(tiny_ckpt)
    export_codec(run, tiny_ckpt)  # into the checkpoint itself
    assert (tiny_ckpt / "model.safetensors").read_bytes() == before and fingerprint(tiny_ckpt) == fp
    assert (tiny_ckpt / codecs.CODEC_DIR / codecs.CODEC_FILE).is_file()
    assert codecs.required_codec(tiny_ckpt) is None and codecs.codec_home(tiny_ckpt) == tiny_ckpt / codecs.CODEC_DIR
    with pytest.raises(errors.ConfigError, match="already carries"):
        export_codec(run, tiny_ckpt)
    other = tmp_path / "other"  # a checkpoint of another model is refused
    shutil.copytree(tiny_ckpt, other, ignore=shutil.ignore_patterns(codecs.CODEC_DIR))
    t = load_file(str(other / "model.safetensors"))
    t = {k: (v + 1 if v.is_floating_point() else v) for k, v in t.items()}
    from safetensors.torch import save_file

    save_file(t, str(other / "model.safetensors"))
    with pytest.raises(errors.ConfigError, match="another model fingerprint"):
        export_codec(run, other)


def test_a_tuned_cloud_codec_is_not_added_to_an_existing_checkpoint(tiny_ckpt, tiny_cifar, tmp_path):
    """A codec whose run fine-tuned the cloud half needs that cloud half: it exports as its own codec checkpoint."""
    run = tmp_path / "run"
    train_bottleneck(str(tiny_ckpt), run, BottleneckConfig(code_channels=4, bits=2, epochs=1, batch_size=32,
                                                           match_blocks=0, limit_train=64), data_dir=tiny_cifar)
    with pytest.raises(errors.ConfigError, match="fine-tuned the cloud half"):
        export_codec(run, tiny_ckpt)
    assert not (tiny_ckpt / codecs.CODEC_DIR).exists() and codecs.codec_home(tiny_ckpt) is None
