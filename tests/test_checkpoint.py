import os

import torch

from hybridexit import HybridConfig, HybridNet
from hybridexit.model.checkpoint import fingerprint, load_model, read_config, save_model, write_checkpoint


def test_a_reader_between_a_writers_two_renames_reads_the_old_copy_and_renames_nothing(tmp_path):
    path = tmp_path / "ck"
    model = HybridNet(HybridConfig(depth=8, edge_layers=2, edge_bits=1, exits=(2,)))
    save_model(path, model, {"data": {"name": "cifar10"}})
    fp = fingerprint(path)
    os.replace(path, tmp_path / "ck.old")  # the writer's first rename; its second has not happened yet
    assert read_config(path)["network"]["edge_layers"] == 2 and fingerprint(path) == fp
    loaded, _ = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not path.exists() and (tmp_path / "ck.old").exists()  # the reader renamed nothing
    write_checkpoint(path, {"extra.json": {"a": 1}}, {})  # the next write recovers the old copy first
    assert (path / "extra.json").exists() and read_config(path)["network"]["edge_layers"] == 2
    assert not (tmp_path / "ck.old").exists()
