"""Class-folder datasets: the layouts, the hold-outs by content, normalization statistics, augmentation by image size,
the checkpoint's record of its data, and a class-folder dataset through train, calibrate, evaluate, serve and edge
(small generated PNG trees, a few steps each)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hybridexit.cli import main
from hybridexit.data import (
    augment,
    augmenter,
    channel_stats,
    get_split,
    image_ids,
    load_class_folders,
    load_dataset,
    load_recorded,
    random_resized_crop,
)
from hybridexit.errors import DatasetError

COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]  # one per class, with noise: learnable in a few steps
TOKEN = "test-token-0123456789abcdef"


def write_tree(root, size=40, splits=(("train", 12), ("test", 4)), seed=0, sizes=None):
    """ROOT/<split>/class_<c>/<i>.png (``splits``: (folder, images per class); folder "" for one tree)."""
    rng = np.random.default_rng(seed)
    for split, n in splits:
        for c, col in enumerate(COLORS):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (sizes or {}).get((split, c, i), (size, size))
                a = np.clip(np.array(col)[None, None] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def ids_set(split):
    return sorted(image_ids(split.images, split.labels).tolist())


# ---- layouts, hold-outs, statistics --------------------------------------------------------------------------------

def test_each_layout_gives_train_validation_and_test(tmp_path):
    two = load_class_folders(write_tree(tmp_path / "a"))  # train/ + test/: validation held out of train/
    assert two.kind == "folder" and two.classes == ["class_0", "class_1", "class_2"] and two.image_size == 40
    assert len(two.test) == 12 and len(two.train) == 36 and len(two.val_ids) == 4  # 10 % of 36
    assert len(get_split(two, "val")) == 4 and len(get_split(two, "train")) == 32
    iv = load_class_folders(write_tree(tmp_path / "b", splits=(("train", 12), ("val", 4))))  # val/ is the test split
    assert len(iv.test) == 12 and len(iv.val_ids) == 4 and "val/ (the test split)" in iv.layout
    three = load_class_folders(write_tree(tmp_path / "c", splits=(("train", 12), ("val", 2), ("test", 4))))
    val = get_split(three, "val")  # val/ is the validation split, recorded by content in the training pool
    assert len(val) == 6 and len(get_split(three, "train")) == 36 and len(three.test) == 12
    own_val = load_class_folders(tmp_path / "c" / "train", 40)  # (a tree of class folders alone: split by content)
    assert len(own_val.test) == 7 and len(get_split(own_val, "val")) == 3 and len(get_split(own_val, "train")) == 26
    one = load_class_folders(write_tree(tmp_path / "d", splits=(("", 10),)))  # one tree: test and val by content
    assert len(one.test) == 6 and len(get_split(one, "val")) == 2 and len(get_split(one, "train")) == 22


def test_hold_outs_are_chosen_by_content_in_any_copy(tmp_path):
    """Renamed files, another order on disk: the same images land in the same splits."""
    a = load_class_folders(write_tree(tmp_path / "a", splits=(("", 10),)))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for f in sorted((tmp_path / "b").rglob("*.png")):
        f.rename(f.with_name(f"z{9 - int(f.stem)}-{f.stem}.png"))
    b = load_class_folders(tmp_path / "b")
    assert a.content == b.content and a.checksum != b.checksum  # same content, another order
    assert ids_set(a.test) == ids_set(b.test) and sorted(a.val_ids.tolist()) == sorted(b.val_ids.tolist())


def test_statistics_are_the_training_images_own_or_given(tmp_path):
    ds = load_class_folders(write_tree(tmp_path / "t"))
    train = get_split(ds, "train")
    assert ds.mean == channel_stats(train.images)[0] and ds.std == channel_stats(train.images)[1]
    x = train.images.double() / 255
    assert np.allclose(ds.mean, x.mean((0, 2, 3)).tolist(), atol=1e-4)
    assert np.allclose(ds.std, x.std((0, 2, 3), unbiased=False).tolist(), atol=1e-4)
    given = load_dataset("folder", tmp_path / "t", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert given.mean == (0.5, 0.5, 0.5) and given.std == (0.25, 0.25, 0.25)
    with pytest.raises(DatasetError, match="both the mean and the std"):
        load_dataset("folder", tmp_path / "t", mean=[0.5, 0.5, 0.5])


def test_image_size_resizes_and_is_asked_for_when_the_images_differ(tmp_path):
    root = write_tree(tmp_path / "t", splits=(("train", 4), ("test", 2)), sizes={("train", 0, 0): (30, 50)})
    with pytest.raises(DatasetError, match="give --image-size N"):
        load_class_folders(root)
    ds = load_class_folders(root, 24)
    assert ds.train.images.shape[1:] == (3, 24, 24) and ds.test.images.dtype == torch.uint8
    with pytest.raises(DatasetError, match="32x32"):
        load_dataset("cifar10", tmp_path, image_size=64)


def test_a_recorded_dataset_loads_the_same_data_from_its_folder_or_a_copy(tmp_path):
    ds = load_class_folders(write_tree(tmp_path / "t"))
    rec = ds.record()
    assert rec["kind"] == "folder" and rec["image_size"] == 40 and rec["root"] == str((tmp_path / "t").resolve())
    again = load_recorded(rec)  # from the recorded folder
    assert again.checksum == ds.checksum and again.mean == ds.mean and again.classes == ds.classes
    shutil.copytree(tmp_path / "t", tmp_path / "copy")
    assert load_recorded(rec, tmp_path / "copy").content == ds.content
    shutil.rmtree(tmp_path / "t")
    with pytest.raises(DatasetError, match="give its folder with --data-dir"):
        load_recorded(rec)


# ---- augmentation by image size -------------------------------------------------------------------------------------

def test_augmentation_follows_the_image_size():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(augmenter(32)(x, a), augment(x, b))  # CIFAR's pad-crop-flip, the same draws
    big = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8, generator=g)
    out = augmenter(96)(big, torch.Generator().manual_seed(2))  # random-resized crop + flip
    assert out.shape == big.shape and out.dtype == torch.uint8 and not torch.equal(out, big)
    whole = random_resized_crop(big, torch.Generator().manual_seed(3), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for o, i in zip(whole, big):  # the whole image, resampled at its own pixel centres: exact, or exactly flipped
        assert torch.equal(o, i) or torch.equal(o, i.flip(-1))


# ---- end to end ---------------------------------------------------------------------------------------------------

def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_per_definition() -> list[str]:
    """Every registered backbone, one per definition: a deeper sibling of the same blocks and stem (cifar_resnet32 ..
    110 after cifar_resnet20, resnet34 after resnet18) runs the same code."""
    from hybridexit.model.backbones import BACKBONES, get_backbone

    seen, names = set(), []
    for name in BACKBONES:
        b = get_backbone(name)
        sig = (type(b).__name__, getattr(b, "bottleneck", None), getattr(b, "small_stem", None))
        if sig not in seen:
            seen.add(sig)
            names.append(name)
    return names


@pytest.mark.parametrize("backbone", _one_per_definition())
def test_a_class_folder_dataset_trains_calibrates_evaluates_serves_and_runs_on_the_edge(tmp_path, capsys,
                                                                                      monkeypatch, backbone):
    from hybridexit.model.backbones import get_backbone
    from hybridexit.runtime.process import ServerProcess

    b = get_backbone(backbone)  # one edge block, an exit after it, the backbone's quantized edge (binary if float)
    net = ["--backbone", backbone, "--edge-blocks", "1", "--exits", str(b.per_block),
           "--edge-bits", str(1 if b.default_edge_bits == 32 else b.default_edge_bits)]
    tree = write_tree(tmp_path / "tree", size=36, splits=(("train", 8), ("test", 2)))  # small: 5 backbones
    ck = tmp_path / "ck"
    assert main(["train", "--data-dir", str(tree), *net, "--exit-pool", "global", "--epochs", "1",
                 "--batch-size", "16", "--out", str(ck)]) == 0
    capsys.readouterr()
    cfg = json.loads((ck / "config.json").read_text())
    d = cfg["data"]
    assert d["kind"] == "folder" and d["classes"] == ["class_0", "class_1", "class_2"] and d["image_size"] == 36
    assert cfg["network"]["image_size"] == 36 and cfg["network"]["num_classes"] == 3
    assert cfg["network"]["mean"] == d["mean"] and d["val_size"] == 2 and d["augmentation"] == "pad-crop-flip"

    assert main(["calibrate", str(ck), "--exit-fraction", "0.5", "--write", "--json"]) == 0  # the recorded folder
    cal = json.loads(capsys.readouterr().out)
    assert cal["split"] == "val" and cal["n"] == 2 and cal["written"]

    ev = tmp_path / "ev.jsonl"
    assert main(["evaluate", str(ck), "--split", "test", "--json", "--out", str(ev), "--link", "wifi"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n"] == 6 and s["link"]["send_image"]["bytes"] == 3 * 36 * 36
    img = tmp_path / "img.jsonl"  # the test folder as edge inputs: the same images, read at the network's size
    assert main(["evaluate", str(ck), "--images", str(tree / "test"), "--json", "--out", str(img)]) == 0
    capsys.readouterr()
    key = lambda r: (r["prediction"], r["decided_at"], r["label"])  # noqa: E731
    assert [key(r) for r in _records(ev)] == [key(r) for r in _records(img)]

    monkeypatch.setenv("HYBRIDEXIT_TOKEN", TOKEN)
    with ServerProcess(ck, ["--threads", "1"], env={"HYBRIDEXIT_TOKEN": TOKEN}) as srv:
        edge = tmp_path / "edge.jsonl"
        assert main(["edge", str(ck), "--cloud", srv.url, "--data-dir", str(tree), "--json", "--out", str(edge),
                     "--threads", "1", "--batch-size", "4"]) == 0
        es = json.loads(capsys.readouterr().out)
        assert main(["edge", str(ck), "--cloud", srv.url, "--images", str(tree / "test"), "--json", "--threads", "1",
                     "--codec", "int8"]) == 0
        ei = json.loads(capsys.readouterr().out)
    assert es["inputs"] == 6 and es["raw_image_bytes"] == 3 * 36 * 36 and es["failed_requests"] == 0
    assert [key(r) for r in _records(edge)] == [key(r) for r in _records(ev)]  # the same decisions as evaluate
    assert ei["inputs"] == 6 and ei["unreadable_inputs"] == 0 and ei["raw_image_bytes"] == 3888


def test_class_folder_errors_are_one_line(tmp_path, capsys):
    root = tmp_path / "only_train"
    write_tree(root, splits=(("train", 2),))
    assert main(["train", "--data-dir", str(root), "--depth", "8", "--epochs", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither val/ nor test/" in err
    write_tree(root, splits=(("test", 1),))
    assert main(["train", "--data-dir", str(root), "--depth", "8", "--epochs", "1", "--val-size", "3",
                 "--out", str(tmp_path / "o")]) == 2
    assert "val_size applies to CIFAR" in capsys.readouterr().err


def test_a_recipe_sets_the_image_size_and_statistics_and_large_images_get_random_resized_crops(tmp_path, capsys):
    tree = write_tree(tmp_path / "tree", size=40, splits=(("train", 4), ("test", 1)))
    recipe = tmp_path / "r.toml"
    recipe.write_text("epochs = 1\nbatch_size = 16\nimage_size = 72\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n")
    assert main(["train", "--data-dir", str(tree), "--depth", "8", "--recipe", str(recipe), "--out",
                 str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["data"]["image_size"] == 72 and cfg["data"]["augmentation"] == "random-resized-crop-flip"
    assert cfg["network"]["image_size"] == 72 and cfg["network"]["mean"] == [0.5] * 3 and cfg["data"]["std"] == [0.25] * 3
    from hybridexit.errors import ConfigError
    from hybridexit.workflows.recipes import load_recipe

    with pytest.raises(ConfigError, match=r"sets data options \['image_size', 'mean', 'std'\]"):
        load_recipe(recipe)  # the sweep builds its own network on CIFAR: a recipe's data options are refused there
    recipe.write_text("epochs = 1\nmean = [0.5, 0.5, 0.5]\n")
    assert main(["train", "--data-dir", str(tree), "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "give both mean and std" in capsys.readouterr().err
