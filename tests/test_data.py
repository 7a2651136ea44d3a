import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import write_tiny_cifar10

from hybridexit.data.datasets import (
    augment,
    get_split,
    load_cifar,
    load_image_folder,
    resolve_data_dir,
    safe_load_pickle,
    train_val_split,
)
from hybridexit.errors import DatasetError


def test_loads_extracted_folder(tiny_cifar):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    assert any("not the official cifar10 content" in str(x.message) for x in w)  # not the official content
    assert ds.train.images.shape == (200, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (40, 3, 32, 32) and ds.classes[3] == "class3"
    assert len(ds.checksum) == 64


def test_loads_archive_same_content(tmp_path, tiny_cifar):
    arch = write_tiny_cifar10(tmp_path / "arch", as_archive=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = load_cifar("cifar10", tiny_cifar, download_ok=False), load_cifar("cifar10", arch, download_ok=False)
    assert a.checksum == b.checksum
    assert torch.equal(a.train.images, b.train.images)


def test_channel_major_layout(tiny_cifar):
    raw = pickle.loads((tiny_cifar / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    assert np.array_equal(ds.train.images[0, 1].numpy().ravel(), raw["data"][0, 1024:2048])


class Evil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('echo pwned')",))


def test_restricted_unpickler_rejects_malicious_pickle():
    blob = pickle.dumps({"data": Evil()})
    with pytest.raises(DatasetError, match="refusing to load global builtins.eval"):
        safe_load_pickle(blob, "evil")


def test_corrupted_archive_refused_with_its_name(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz"):
        load_cifar("cifar10", tmp_path, download_ok=False)


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match="looked for .*cifar-10-batches-py"):
        load_cifar("cifar10", tmp_path, download_ok=False)


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRIDEXIT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("HYBRIDEXIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "cache" / "hybridexit"


def test_validation_split_is_deterministic_and_disjoint(tiny_cifar):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    ds.train.images[:, 0, 0, 0] = torch.arange(200, dtype=torch.uint8)  # tag each image
    tr, va = train_val_split(ds.train, 50, seed=0)
    tr2, va2 = train_val_split(ds.train, 50, seed=0)
    assert torch.equal(va.images, va2.images) and len(tr) == 150 and len(va) == 50
    tags_tr, tags_va = set(tr.images[:, 0, 0, 0].tolist()), set(va.images[:, 0, 0, 0].tolist())
    assert tags_tr.isdisjoint(tags_va) and len(tags_tr | tags_va) == 200
    assert get_split(ds, "test") is ds.test


def test_validation_split_found_by_content_in_a_reordered_copy(tiny_cifar):
    from hybridexit.data import Split, image_ids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    val = get_split(ds, "val", 50, 0)
    ids = image_ids(val.images, val.labels)
    perm = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(3))
    ds.train = Split(ds.train.images[perm], ds.train.labels[perm], "train")  # another copy, another order
    val2, tr2 = get_split(ds, "val", val_ids=ids), get_split(ds, "train", val_ids=ids)
    assert sorted(image_ids(val2.images, val2.labels).tolist()) == sorted(ids.tolist()) and len(tr2) == 150
    assert set(image_ids(tr2.images, tr2.labels).tolist()).isdisjoint(ids.tolist())
    pos = image_ids(ds.train.images, ds.train.labels).tolist().index(int(ids[0]))
    ds.train.images[pos] ^= 1  # one validation image is not in this copy
    with pytest.raises(DatasetError, match="not in this copy"):
        get_split(ds, "val", val_ids=ids)


def test_official_content_recognised_in_any_order(tiny_cifar):
    from hybridexit.data import Split, content_checksum

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    perm = torch.randperm(len(ds.test))
    assert content_checksum(ds.train, Split(ds.test.images[perm], ds.test.labels[perm])) == ds.content
    assert ds.content != content_checksum(ds.train, Split(ds.test.images, ds.test.labels.roll(1)))
    with pytest.warns(UserWarning, match="not the official cifar10 content") as rec:
        load_cifar("cifar10", tiny_cifar, download_ok=False)
    assert len(rec) == 1


def test_augment_crops_and_flips_whole_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
    x = x.repeat(64, 1, 1, 1)
    y = augment(x, g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    assert 0 < int(same.sum() + flipped.sum()) < 128  # some untouched, most cropped/flipped
    # every output row is a (possibly shifted) row of the zero-padded input
    assert int((y == 0).sum()) > int((x == 0).sum())


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "test" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (i * 100, 50, 0)).save(tmp_path / "test" / cls / f"{i}.png")
    s = load_image_folder(tmp_path, "test")
    assert s.images.shape == (4, 3, 32, 32) and s.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(DatasetError, match="not found"):
        load_image_folder(tmp_path, "train")


def test_identical_images_under_different_labels_are_different_samples(tiny_cifar):
    """CIFAR-100's training set holds identical images under different labels: a validation record must keep them
    apart, or a held-out sample is swapped for a training one."""
    from hybridexit.data import Split, image_ids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    ds.train.images[1] = ds.train.images[0]
    ds.train.labels[1] = (ds.train.labels[0] + 1) % 10
    assert image_ids(ds.train.images[:2]).unique().numel() == 1
    ids = image_ids(ds.train.images[:1], ds.train.labels[:1])  # the first sample is the held-out one
    assert int(get_split(ds, "val", val_ids=ids).labels[0]) == int(ds.train.labels[0])
    tr = get_split(ds, "train", val_ids=ids)
    assert int(ds.train.labels[1]) in tr.labels[(tr.images == ds.train.images[0]).flatten(1).all(1)].tolist()
    assert isinstance(tr, Split)
