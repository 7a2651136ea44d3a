import json
import subprocess
import sys
import warnings

import pytest

from hybridexit.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_energy_json_paper_configuration(capsys):
    code, out, _ = run(capsys, "energy", "--depth", "32", "--classes", "10", "--edge-layers", "20", "--edge-bits", "1",
                       "--exits", "20", "--exit-rate", "0.65", "--json")
    d = json.loads(out)
    assert code == 0
    assert d["fp32_uj"] == pytest.approx(317, rel=0.03)
    assert d["edge_uj"] == pytest.approx(11.3, rel=0.03)
    assert d["cloud_uj"] == pytest.approx(103, rel=0.03)
    assert d["expected_uj"] == pytest.approx(47, rel=0.03)
    assert d["reduction"] == pytest.approx(6.7, rel=0.03)
    assert d["reduction"] == pytest.approx(d["fp32_uj"] / d["expected_uj"])


def test_energy_several_exits_one_rate_each(capsys):
    code, out, _ = run(capsys, "energy", "--edge-layers", "20", "--edge-bits", "2", "--exits", "10", "20",
                       "--exit-rate", "0.2", "0.3", "--json")
    d = json.loads(out)
    assert code == 0 and d["exit_rate"] == [0.2, 0.3]
    assert d["edge_macs_by_bits"]["2"] == pytest.approx(46.0e6, rel=0.01)  # 20 block convs (NOTES.md worked check)
    assert d["fp32_uj"] == pytest.approx(317, rel=0.01)
    p0, p1 = d["exit_path_uj"]
    assert p0 < p1 <= d["edge_uj"] < d["edge_uj"] + d["cloud_uj"] < d["fp32_uj"]
    assert d["expected_uj"] == pytest.approx(0.2 * p0 + 0.3 * p1 + 0.5 * (d["edge_uj"] + d["cloud_uj"]))
    assert d["reduction"] == pytest.approx(d["fp32_uj"] / d["expected_uj"])


@pytest.mark.parametrize("args,msg", [
    (["--edge-layers", "21"], "block boundary"),
    (["--edge-layers", "40"], "from 0 to 30"),
    (["--edge-layers", "10", "--exits", "20"], "not allowed"),
    (["--edge-bits", "3"], "unsupported bit width"),
    (["--edge-layers", "20", "--exits", "20", "--exit-rate", "-0.1"], "not a fraction"),
    (["--edge-layers", "20", "--exits", "20", "--exit-rate", "1.5"], "not a fraction"),
])
def test_bad_input_one_line_nonzero_no_traceback(capsys, args, msg):
    import re

    code, out, err = run(capsys, "energy", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and re.search(msg, err) and "Traceback" not in err


def test_summary_prints_every_layer(capsys):
    code, out, _ = run(capsys, "summary", "--edge-layers", "20", "--edge-bits", "1", "--exits", "20")
    assert code == 0 and out.count(".conv") == 30 and "exit:0" in out and "total cloud" in out


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "hybridexit.cli", "energy", "--edge-bits", "5"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "unsupported bit width 5" in r.stderr and "Traceback" not in r.stderr


def test_train_evaluate_calibrate_roundtrip(tmp_path, tiny_cifar, capsys):
    ck = str(tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--data-dir", str(tiny_cifar), "--out", ck, "--depth", "8", "--edge-layers", "4",
                     "--edge-bits", "1", "--exits", "4", "--epochs", "1", "--batch-size", "50", "--val-size", "50"]) == 0
        capsys.readouterr()
        code, out, err = run(capsys, "evaluate", ck, "--data-dir", str(tiny_cifar), "--json")
        assert code == 2 and "calibrate" in err  # no thresholds yet: says what to do
        assert main(["calibrate", ck, "--data-dir", str(tiny_cifar), "--exit-fraction", "0.5", "--json", "--write"]) == 0
        cal = json.loads(capsys.readouterr().out)
        code, out, _ = run(capsys, "evaluate", ck, "--data-dir", str(tiny_cifar), "--json", "--limit", "30",
                           "--out", str(tmp_path / "r.jsonl"))
    d = json.loads(out)
    assert code == 0 and d["n"] == 30 and cal["edge_fraction"] <= 0.5
    for key in ("accuracy", "exit_fraction", "edge_fraction", "cloud_accuracy", "reduction", "expected_uj", "fp32_uj"):
        assert key in d
    assert 0 <= d["accuracy"] <= 1 and 0 <= d["edge_fraction"] <= 1
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(30))
    assert {r["decided_at"] for r in recs} <= {"exit:0", "cloud"}
    assert d["accuracy"] == pytest.approx(sum(r["label"] == r["prediction"] for r in recs) / 30)
    # the same 30 images as an image folder (FOLDER/<class>/*.png, like torchvision's ImageFolder): same answers
    from PIL import Image

    from hybridexit.data import load_cifar

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    for i in range(30):
        (tmp_path / "imgs" / ds.classes[int(ds.test.labels[i])]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.test.images[i].permute(1, 2, 0).numpy()).save(
            tmp_path / "imgs" / ds.classes[int(ds.test.labels[i])] / f"{i:03d}.png")
    code, out, _ = run(capsys, "evaluate", ck, "--images", str(tmp_path / "imgs"), "--json", "--out",
                       str(tmp_path / "f.jsonl"))
    assert code == 0 and json.loads(out)["n"] == 30 and json.loads(out)["accuracy"] == pytest.approx(d["accuracy"])
    folder = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    by_image = {int(r["path"].split("/")[-1][:3]): r for r in folder}
    assert [(by_image[i]["prediction"], by_image[i]["label"]) for i in range(30)] == [(r["prediction"], r["label"])
                                                                                      for r in recs]


def test_evaluate_network_without_exits_needs_no_thresholds(tmp_path, tiny_cifar, capsys):
    """A float network (no exits) is evaluated as it is: no calibration, everything at the cloud."""
    ck = str(tmp_path / "fp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--data-dir", str(tiny_cifar), "--out", ck, "--depth", "8", "--epochs", "1",
                     "--batch-size", "50", "--val-size", "50", "--limit-train", "100"]) == 0
        capsys.readouterr()
        code, out, err = run(capsys, "evaluate", ck, "--data-dir", str(tiny_cifar), "--json", "--limit", "20")
    d = json.loads(out)
    assert code == 0 and d["n"] == 20 and d["thresholds"] == [] and d["cloud_fraction"] == 1.0, err
