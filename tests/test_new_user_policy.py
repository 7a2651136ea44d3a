"""A calibration with a guarantee tried without touching a shipped exit policy (issue 35, item 8): ``calibrate
--policy-out FILE`` writes the policy to a file of its own, ``evaluate`` and ``edge`` take it with ``--policy FILE``;
a file made for another checkpoint is refused; ``--delta 0`` is refused before any work."""

import json
import warnings

import pytest
from conftest import write_tiny_checkpoint
from test_new_user_network import TOKEN, Server

from hybridexit import HybridConfig
from hybridexit.cli import main
from hybridexit.data import load_cifar
from hybridexit.model.policy import ExitPolicy, read_policy, write_policy
from hybridexit.runtime.server import ServerSettings
from hybridexit.workflows.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A tiny trained checkpoint with a policy of its own (no guarantee), as a shipped one has."""
    from conftest import write_tiny_cifar10

    root = tmp_path_factory.mktemp("policy")
    data = write_tiny_cifar10(root / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", data, download_ok=False)
        train(root / "ck", HybridConfig(depth=8, edge_layers=4, edge_bits=1, exits=(2, 4)),
              TrainConfig(epochs=2, batch_size=32, val_size=100, lr=0.05), ds, progress=False)
    write_policy(root / "ck", ExitPolicy((0.7, 0.9)))
    return root / "ck", data


def test_a_guarantee_goes_to_its_own_file_and_the_commands_use_it(shipped, tmp_path, capsys, monkeypatch):
    ck, data = shipped
    before = (ck / "exit_policy.json").read_bytes()
    out = tmp_path / "ltt-policy.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(ck), "--data-dir", str(data), "--risk", "0.6", "--delta", "0.5", "--risk-kind",
                     "label", "--temperature", "--policy-out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"written to {out}" in said and "own policy is unchanged" in said
    assert (ck / "exit_policy.json").read_bytes() == before  # the shipped policy is untouched
    record = json.loads(out.read_text())
    assert record["current"]["guarantee"]["eps"] == 0.6 and record["checkpoint"]["path"] == str(ck)
    thresholds = record["current"]["thresholds"]
    assert thresholds != [0.7, 0.9]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["evaluate", str(ck), "--data-dir", str(data), "--policy", str(out), "--json",
                     "--engine", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["thresholds"] == thresholds

    srv = Server(ck, ServerSettings(token=TOKEN))
    try:
        monkeypatch.setenv("HYBRIDEXIT_TOKEN", TOKEN)
        edge = ["edge", str(ck), "--cloud", srv.url, "--data-dir", str(data), "--limit", "20", "--engine", "torch",
                "--audit-rate", "0.5", "--json"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(edge) == 2  # the shipped policy has no guarantee: no EPS for the audit
            assert "EPS" in capsys.readouterr().err
            assert main([*edge, "--policy", str(out)]) == 0  # the file's guarantee gives it
        s = json.loads(capsys.readouterr().out)
        assert s["thresholds"] == thresholds and s["audit_eps"] == 0.6
    finally:
        srv.stop()
    assert read_policy(ck) == ExitPolicy((0.7, 0.9))


def test_a_policy_file_of_another_checkpoint_is_refused(shipped, tmp_path, capsys):
    ck, data = shipped
    other = write_tiny_checkpoint(tmp_path / "other", exits=(2, 4), thresholds=(0.5, 0.5))
    from hybridexit.model.checkpoint import fingerprint
    from hybridexit.model.policy import write_policy_file

    write_policy_file(tmp_path / "p.json", ExitPolicy((0.1, 0.2)), other, fingerprint(other))
    assert main(["evaluate", str(ck), "--data-dir", str(data), "--policy", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "calibrated for the checkpoint" in err


@pytest.mark.parametrize("flag", [["--delta", "0"], ["--delta", "1"], ["--risk", "0"]])
def test_an_impossible_risk_or_delta_is_refused_at_once(shipped, flag, capsys):
    ck, data = shipped
    argv = ["calibrate", str(ck), "--data-dir", str(data), "--risk", "0.05", *flag]
    assert main(argv) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
