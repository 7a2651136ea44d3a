"""The edge when things go wrong: the cloud is down (the summary says how many inputs fell back and does not
count them as energy savings) and a folder holds files that are not images (each still gets its record)."""

import json

import pytest
import torch
from conftest import random_inputs, write_tiny_checkpoint

from hybridexit.cli import main
from hybridexit.model.checkpoint import load_model
from hybridexit.model.energy import energy_report
from hybridexit.model.policy import ExitPolicy, write_policy
from hybridexit.runtime.client import EdgeOptions, run_edge
from hybridexit.runtime.server import bind_socket, url_of
from hybridexit.runtime.summary import format_summary

N = 24


@pytest.fixture(scope="module")
def images():
    return random_inputs(N, seed=5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, images):
    """Threshold at the median exit entropy of these images: about half exit, half need the cloud."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("fail") / "ck")
    model, _ = load_model(path)
    edge, _ = model.split()
    with torch.no_grad():
        ents = edge.decide(images.images, (0.0,)).entropies[:, 0]
    write_policy(path, ExitPolicy((float(ents.median()),)))
    return path


@pytest.fixture
def dead_url():
    s = bind_socket("127.0.0.1", 0)
    url = url_of(s)
    s.close()  # nothing listens: connection refused
    return url


def test_cloud_down_summary_counts_fallbacks_and_no_savings(ckpt, images, dead_url):
    summary, recs = run_edge(ckpt, images, EdgeOptions(dead_url, retries=0, cooldown_s=60))
    exited = sum(r["decided_at"].startswith("exit:") for r in recs)
    fell = sum(r["decided_at"] == "fallback" for r in recs)
    assert exited > 0 and fell > 0 and exited + fell == N
    assert summary["fallback_inputs"] == fell and summary["inputs"] == N
    model, _ = load_model(ckpt)
    report = energy_report(model.cfg)
    designed = report.fp32_uj / report.expected_uj([exited / N])  # the fallbacks charged the cloud they needed
    spent = report.expected_uj([exited / N]) - fell / N * report.cloud_uj  # the edge alone answered them
    assert summary["reduction"] == pytest.approx(designed) and summary["spent_uj"] == pytest.approx(spent)
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[2].startswith("FELL BACK") and f"{fell} of {N} inputs" in lines[2]
    assert f"{designed:.2f} x  (the {fell} fallbacks charged as cloud answers" in text
    inflated = report.fp32_uj / spent  # the old headline, fallbacks presented as savings
    assert inflated > 1.5 * designed and f"{inflated:.2f} x" not in text


def test_all_fell_back_charges_every_input_the_cloud(ckpt, images, dead_url, tmp_path):
    nothing_exits = tmp_path / "ck0"
    nothing_exits.mkdir()
    for f in ckpt.iterdir():
        (nothing_exits / f.name).write_bytes(f.read_bytes())
    write_policy(nothing_exits, ExitPolicy((0.0,)))
    summary, recs = run_edge(nothing_exits, images, EdgeOptions(dead_url, retries=0, cooldown_s=60))
    assert {r["decided_at"] for r in recs} == {"fallback"} and summary["fallback_inputs"] == N
    report = energy_report(load_model(ckpt)[0].cfg)
    assert summary["reduction"] == pytest.approx(report.fp32_uj / (report.edge_uj + report.cloud_uj))
    text = format_summary(summary)
    assert f"{N} of {N} inputs (100.00 %)" in text and f"the {N} fallbacks charged as cloud answers" in text


def test_unreadable_images_get_a_record_and_the_run_goes_on(ckpt, images, dead_url, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    for i in range(4):
        d = folder / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images.images[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    (folder / "class0" / "garbage.png").write_bytes(b"this is not a png")
    good = (folder / "class1" / "1.png").read_bytes()
    (folder / "class1" / "truncated.png").write_bytes(good[:len(good) // 2])
    out = tmp_path / "r.jsonl"
    code = main(["edge", str(ckpt), "--cloud", dead_url, "--retries", "0", "--images", str(folder), "--out",
                 str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(6)) and len({r["path"] for r in recs}) == 6
    bad = {r["path"]: r for r in recs if r["decided_at"] == "unreadable"}
    assert set(bad) == {"class0/garbage.png", "class1/truncated.png"}
    for r in bad.values():
        assert r["prediction"] is None and r["error"] and r["path"].split("/")[1] in r["error"]
        assert r["label_name"] == r["path"].split("/")[0]
    ok = [r for r in recs if r["decided_at"] != "unreadable"]
    assert all(r["prediction_name"] == f"class{r['prediction']}" for r in ok)
    assert summary["inputs"] == 6 and summary["unreadable_inputs"] == 2 and summary["n"] == 4
