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


def test_an_old_format_checkpoint_migrates_on_read(tmp_path):
    """Written before exit_policy.json and the normalization in the network config: thresholds inside config.json's
    network, the calibration record beside it, mean/std only in the data record. Read as it is, nothing rewritten
    (what scripts/migrate_checkpoints.py once did by hand)."""
    import json

    from conftest import write_tiny_checkpoint

    from hybridexit.model.policy import POLICY_FILE, read_policy

    ck = write_tiny_checkpoint(tmp_path / "ck", thresholds=(0.7,))
    model, meta = load_model(ck)
    cfg_file = ck / "config.json"
    old = json.loads(cfg_file.read_text())
    mean, std = old["network"].pop("mean"), old["network"].pop("std")
    old["network"]["thresholds"] = [0.42]
    old["data"].update(mean=mean, std=std, checksum="abc")
    old["calibration"] = {"split": "val", "n": 500, "target": "max_drop", "value": 0.01}
    cfg_file.write_text(json.dumps(old))
    (ck / POLICY_FILE).unlink()
    before = sorted((p.name, p.read_bytes()) for p in ck.iterdir())
    migrated, mmeta = load_model(ck)
    assert migrated.cfg == model.cfg  # thresholds dropped from the network, mean/std taken from the data record
    assert all(torch.equal(a, b) for a, b in zip(migrated.state_dict().values(), model.state_dict().values()))
    policy = read_policy(ck)
    assert policy.thresholds == (0.42,) and mmeta["policy"] == policy
    assert policy.chosen_by == {"method": "target", "migrated_from": "config.json", "split": "val", "n": 500,
                             "target": "max_drop", "value": 0.01, "data_checksum": "abc"}
    assert sorted((p.name, p.read_bytes()) for p in ck.iterdir()) == before  # read only
