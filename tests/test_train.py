import json
import math

import pytest
import torch
import torch.nn.functional as F

from hybridexit import CheckpointError, ConfigError, HybridConfig
from hybridexit.data import augment, batches, get_split, image_ids
from hybridexit.model.checkpoint import STATE_FILE, load_model, read_tensors, read_val_ids
from hybridexit.model.hybrid import HybridNet
from hybridexit.workflows.train import TrainConfig, _per_sample_loss, train

NET = HybridConfig(depth=8, edge_layers=4, edge_bits=1, exits=(2, 4))


def tcfg(**kw):
    base = dict(epochs=2, batch_size=32, val_size=40, lr=0.05, warmup_epochs=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_checkpoint_rebuilds_with_no_flags(tmp_path, ds):
    meta = train(tmp_path / "ck", NET, tcfg(), ds, progress=False)
    model, meta2 = load_model(tmp_path / "ck")
    assert model.cfg == NET.replace(mean=tuple(ds.mean), std=tuple(ds.std))  # preprocessing travels with the model
    assert meta2["epochs_done"] == 2 and meta2["data"]["checksum"] == ds.checksum
    assert len(meta["val_acc"]) == 3
    log = [json.loads(line) for line in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, ds):
    train(tmp_path / "full", NET, tcfg(), ds, progress=False)
    train(tmp_path / "part", NET, tcfg(), ds, progress=False, stop_after_epochs=1)
    assert json.loads((tmp_path / "part" / "config.json").read_text())["epochs_done"] == 1
    with pytest.raises(CheckpointError, match="--resume"):
        train(tmp_path / "part", NET, tcfg(), ds, progress=False)
    train(tmp_path / "part", NET, tcfg(), ds, progress=False, resume=True)
    a, b = read_tensors(tmp_path / "full"), read_tensors(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_adam_resumes_with_its_moments(tmp_path, ds):
    cfg = tcfg(optimizer="adam", lr=1e-3, weight_decay=0.0)
    train(tmp_path / "full", NET, cfg, ds, progress=False)
    train(tmp_path / "part", NET, cfg, ds, progress=False, stop_after_epochs=1)
    state = read_tensors(tmp_path / "part", STATE_FILE)
    assert any(k.endswith(".exp_avg_sq") for k in state)  # AdamW's second moments are saved, not only SGD's
    train(tmp_path / "part", NET, cfg, ds, progress=False, resume=True)
    a, b = read_tensors(tmp_path / "full"), read_tensors(tmp_path / "part")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert json.loads((tmp_path / "full" / "config.json").read_text())["train"]["optimizer"] == "adam"


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="optimizer"):
        tcfg(optimizer="lamb")


def test_resume_refuses_a_different_config(tmp_path, ds):
    train(tmp_path / "ck", NET, tcfg(), ds, progress=False, stop_after_epochs=1)
    with pytest.raises(CheckpointError, match="differs"):
        train(tmp_path / "ck", NET, tcfg(lr=0.2), ds, progress=False, resume=True)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, ds, monkeypatch):
    train(tmp_path / "ck", NET, tcfg(epochs=1), ds, progress=False)
    before = read_tensors(tmp_path / "ck")
    import hybridexit.model.checkpoint as ck

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.write_checkpoint(tmp_path / "ck", {"config.json": {"x": 1}}, {"model.safetensors": before})
    monkeypatch.undo()
    after = read_tensors(tmp_path / "ck")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["epochs_done"] == 1


def _changed(a, b, prefix):
    return {k for k in a if k.startswith(prefix) and a[k].is_floating_point() and not torch.equal(a[k], b[k])}


def test_separate_freezes_backbone_then_trains_only_exits(tmp_path, ds):
    train(tmp_path / "sep", NET, tcfg(mode="separate", epochs=1, exit_epochs=1), ds, progress=False,
          stop_after_epochs=1)
    after_backbone = read_tensors(tmp_path / "sep")
    train(tmp_path / "sep", NET, tcfg(mode="separate", epochs=1, exit_epochs=1), ds, progress=False, resume=True)
    after_exits = read_tensors(tmp_path / "sep")
    assert _changed(after_backbone, after_exits, "exits.")  # exits learn in phase 2
    backbone = {k for k in after_exits if not k.startswith("exits.")}
    assert all(torch.equal(after_backbone[k], after_exits[k]) for k in backbone)  # weights and BN stats frozen


def test_distillation_loss_mixes_cross_entropy_and_the_teacher():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(_per_sample_loss(logits, y, None, tcfg()), ce)
    same = torch.log_softmax(logits / 4.0, 1)  # a teacher that agrees with the student adds nothing
    assert torch.allclose(_per_sample_loss(logits, y, same, tcfg(kd_alpha=0.5)), 0.5 * ce, atol=1e-6)
    other = torch.log_softmax(torch.randn(6, 10) / 4.0, 1)
    assert (_per_sample_loss(logits, y, other, tcfg(kd_alpha=0.5)) > 0.5 * ce).all()
    assert torch.allclose(_per_sample_loss(logits, y, other, tcfg(kd_alpha=0.0)), ce)


def test_separate_mode_exits_distill_from_the_teacher(tmp_path, ds):
    train(tmp_path / "j", NET, tcfg(epochs=1), ds, progress=False)
    j = str(tmp_path / "j")
    for alpha in (0.0, 0.5):  # phase 2 only (epochs=0): same frozen backbone, exits trained with/without KD
        train(tmp_path / f"s{alpha}", NET, tcfg(mode="separate", epochs=0, exit_epochs=1, init=j, teacher=j,
                                                kd_alpha=alpha), ds, progress=False)
    a, b = read_tensors(tmp_path / "s0.0"), read_tensors(tmp_path / "s0.5")
    assert _changed(a, b, "exits.")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("exits."))


def test_cloud_mode_trains_only_the_cloud_half(tmp_path, ds):
    train(tmp_path / "j", NET, tcfg(epochs=1), ds, progress=False)
    before = read_tensors(tmp_path / "j")
    meta = train(tmp_path / "c", NET, tcfg(mode="cloud", epochs=1, init=str(tmp_path / "j")), ds, progress=False)
    after = read_tensors(tmp_path / "c")
    cloud = ("blocks.2.", "head.")  # depth 8: one block per stage; edge_layers 4 = blocks 0 and 1
    assert _changed(before, after, "blocks.2.") and _changed(before, after, "head.")
    frozen = {k for k in after if not k.startswith(cloud)}  # stem, edge blocks, exits: weights and BN statistics
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    rec = json.loads((tmp_path / "c" / "log.jsonl").read_text())
    assert meta["val_acc"] and rec["phase"] == "cloud"
    assert rec["train_acc"][:2] == [None, None] and 0 <= rec["train_acc"][2] <= 1  # exits not trained here


def _set_thresholds(path, thresholds):
    cfg = json.loads((path / "config.json").read_text())
    cfg["network"]["thresholds"] = list(thresholds)
    (path / "config.json").write_text(json.dumps(cfg))


def _cloud_weights_unchanged(before, after):  # depth 8, edge_layers 4: blocks.2 is the cloud's only block
    keys = [k for k in before if k.startswith("blocks.2.") and k.endswith("weight")]
    return keys and all(torch.equal(before[k], after[k]) for k in keys)


def test_easy_weight_drops_the_samples_the_exits_decide(tmp_path, ds):
    train(tmp_path / "j", NET, tcfg(epochs=1), ds, progress=False)
    before = read_tensors(tmp_path / "j")
    with pytest.raises(ConfigError, match="thresholds"):  # not calibrated yet
        train(tmp_path / "x", NET, tcfg(mode="cloud", epochs=1, init=str(tmp_path / "j"), easy_weight=0.0), ds,
              progress=False)
    runs = {}
    for name, thr in (("all_exit", 99.0), ("none_exit", 0.0)):  # entropy < 99 always; < 0 never
        _set_thresholds(tmp_path / "j", (thr, thr))
        train(tmp_path / name, NET, tcfg(mode="cloud", epochs=1, init=str(tmp_path / "j"), easy_weight=0.0,
                                          weight_decay=0.0), ds, progress=False)
        runs[name] = (read_tensors(tmp_path / name), json.loads((tmp_path / name / "log.jsonl").read_text()))
    # every sample decided at the edge and weighted 0: no gradient reaches the cloud, its weights stay put
    assert runs["all_exit"][1]["cloud_share"] == 0.0
    assert _cloud_weights_unchanged(before, runs["all_exit"][0])
    # no sample decided: every sample has weight 1 and the cloud trains
    assert runs["none_exit"][1]["cloud_share"] == 1.0
    assert _changed(before, runs["none_exit"][0], "blocks.2.")


def test_easy_weight_resumes_with_the_thresholds_it_began_with(tmp_path, ds):
    train(tmp_path / "j", NET, tcfg(epochs=1), ds, progress=False)
    before = read_tensors(tmp_path / "j")
    _set_thresholds(tmp_path / "j", (99.0, 99.0))  # every sample exits: weight 0, the cloud must not move
    cfg = tcfg(mode="cloud", epochs=2, init=str(tmp_path / "j"), easy_weight=0.0, weight_decay=0.0)
    train(tmp_path / "c", NET, cfg, ds, progress=False, stop_after_epochs=1)
    _set_thresholds(tmp_path / "j", (0.0, 0.0))  # recalibrated in between: must not change the running schedule
    meta = train(tmp_path / "c", NET, cfg, ds, progress=False, resume=True)
    assert meta["epochs_done"] == 2 and meta["easy_thresholds"] == [99.0, 99.0]
    assert _cloud_weights_unchanged(before, read_tensors(tmp_path / "c"))


def test_easy_weight_needs_cloud_mode():
    with pytest.raises(ConfigError, match="cloud"):
        tcfg(easy_weight=0.5)


def test_cloud_mode_needs_an_init():
    with pytest.raises(ConfigError, match="init"):
        tcfg(mode="cloud")


def test_joint_trains_backbone_and_exits_together(tmp_path, ds):
    torch.manual_seed(0)
    from hybridexit.model.hybrid import HybridNet

    init = HybridNet(NET).state_dict()
    train(tmp_path / "j", NET, tcfg(epochs=1, seed=0), ds, progress=False)
    after = read_tensors(tmp_path / "j")
    assert _changed(init, after, "exits.") and _changed(init, after, "blocks.") and _changed(init, after, "head.")


def test_init_from_float_checkpoint(tmp_path, ds):
    fp = HybridConfig(depth=8)
    train(tmp_path / "fp", fp, tcfg(epochs=1), ds, progress=False)
    train(tmp_path / "hy", NET, tcfg(epochs=1, init=str(tmp_path / "fp"), lr=0.0), ds, progress=False)
    a, b = read_tensors(tmp_path / "fp"), read_tensors(tmp_path / "hy")
    # with lr 0 the latent weights are the float ones (BN running stats move with the data)
    assert torch.equal(a["blocks.0.c1.conv.weight"], b["blocks.0.c1.conv.weight"])
    with pytest.raises(CheckpointError, match="does not fit"):
        train(tmp_path / "bad", HybridConfig(depth=8, num_classes=100), tcfg(init=str(tmp_path / "fp")), ds,
              progress=False)


def test_thread_tuner_keeps_the_faster_setting():
    from hybridexit.threads import ThreadTuner

    before = torch.get_num_threads()
    try:
        t = ThreadTuner(2, every=4, probe=3)
        assert t.current == 2
        for _ in range(4):
            t.record(1.0)  # two threads: slow (another process holds a core)
        assert t.trial == 1 and torch.get_num_threads() == 1
        for _ in range(3):
            t.record(0.4)  # one thread is faster
        assert t.current == 1 and t.trial is None and torch.get_num_threads() == 1
        for _ in range(4):
            t.record(0.4)
        for _ in range(3):
            t.record(0.6)  # two threads tried again, slower: stay on one
        assert t.current == 1 and t.every == 8  # a lost probe doubles the interval
        for _ in range(7):
            t.record(0.4)
        assert t.trial is None
        t.record(0.4)
        assert t.trial == 2
        for _ in range(3):
            t.record(0.1)  # two threads won (the other process ended): interval back to the base
        assert t.current == 2 and t.every == 4
    finally:
        torch.set_num_threads(before)


def test_training_never_sees_a_validation_image(tmp_path, ds, monkeypatch):
    import hybridexit.workflows.train as tr

    seen = []  # every batch of raw images the training steps consume (before augmentation)
    real_prep = tr._prep

    def spy(images, *args, **kw):
        seen.append(image_ids(images))
        return real_prep(images, *args, **kw)

    monkeypatch.setattr(tr, "_prep", spy)
    cfg = tcfg(mode="separate", epochs=1, exit_epochs=1)  # both phases, interrupted and resumed in between
    train(tmp_path / "s", NET, cfg, ds, progress=False, stop_after_epochs=1)
    train(tmp_path / "s", NET, cfg, ds, progress=False, resume=True)
    held_out = get_split(ds, "val", val_ids=read_val_ids(tmp_path / "s"))  # what the checkpoint says it held out
    val = set(image_ids(held_out.images).tolist())
    assert len(held_out) == cfg.val_size
    trained = torch.cat(seen).tolist()
    assert not val & set(trained)
    # and every other training image was used, once per epoch
    assert sorted(trained) == sorted(image_ids(get_split(ds, "train", cfg.val_size).images).tolist() * 2)


def _as_written_before_the_renovation(path, drop_train_fields=()):
    """Rewrite a checkpoint's config as the code of aa00a3a wrote it (the format of the runs started with it):
    thresholds inside the network, no mean/std, no content checksum, no record of the validation images; and
    without the training fields that code did not have."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["network"] = {k: v for k, v in cfg["network"].items() if k not in ("mean", "std")} | {"thresholds": []}
    cfg["data"].pop("content_checksum", None)
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in drop_train_fields}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "val_split.safetensors").unlink(missing_ok=True)


def test_resume_accepts_a_config_written_by_older_code(tmp_path, ds):
    train(tmp_path / "full", NET, tcfg(), ds, progress=False)
    train(tmp_path / "part", NET, tcfg(), ds, progress=False, stop_after_epochs=1)
    # a field the older code did not write takes its default (the 18-epoch FP32 stage had no 'compile', 'optimizer')
    _as_written_before_the_renovation(tmp_path / "part", drop_train_fields=("compile", "optimizer", "easy_weight"))
    meta = train(tmp_path / "part", NET, tcfg(), ds, progress=False, resume=True)
    assert meta["epochs_done"] == 2
    a, b = read_tensors(tmp_path / "full"), read_tensors(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_config_with_an_unknown_training_field(tmp_path, ds):
    train(tmp_path / "ck", NET, tcfg(), ds, progress=False, stop_after_epochs=1)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["train"]["dropout"] = 0.1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="dropout"):
        train(tmp_path / "ck", NET, tcfg(), ds, progress=False, resume=True)


def _reference_joint(ds, net, cfg):
    """Joint optimization (paper Eq. 5) as a plain loop written without train.py's pieces: the same seeds, batches,
    augmentation, Nesterov SGD (no decay on biases/BN), per-step cosine with linear warm-up, lambdas 0.6/K and 0.4."""
    torch.manual_seed(cfg.seed)
    model = HybridNet(net.replace(mean=tuple(ds.mean), std=tuple(ds.std))).to(memory_format=torch.channels_last)
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
                           {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    split = get_split(ds, "train", cfg.val_size, cfg.split_seed)
    steps = math.ceil(len(split) / cfg.batch_size)
    total, warm, k = cfg.epochs * steps, int(cfg.warmup_epochs * steps), len(net.exits)
    lambdas = [0.6 / k] * k + [0.4]
    step = 0
    for _ in range(cfg.epochs):
        model.train()
        for images, labels in batches(split, cfg.batch_size, shuffle=True, generator=gen):
            t = (step - warm) / max(1, total - warm)
            lr = cfg.lr * (step + 1) / warm if step < warm else cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
            for g in opt.param_groups:
                g["lr"] = lr
            outs = model(augment(images, gen))
            loss = sum(w * F.cross_entropy(o, labels, label_smoothing=0.0, reduction="none").mean()
                       for w, o in zip(lambdas, outs))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.state_dict()


def test_joint_training_equals_a_plain_reference_loop(tmp_path, ds):
    cfg = tcfg(warmup_epochs=0.5)  # 5 steps per epoch: 2 warm-up steps, then the cosine
    train(tmp_path / "j", NET, cfg, ds, progress=False, device="cpu")
    ours, ref = read_tensors(tmp_path / "j"), _reference_joint(ds, NET, cfg)
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ours)  # bit for bit: the same computation
