"""The one evaluation loop: one pass over the split gives the decisions, the accuracy with and without a codec, the
cloud's accuracy on the samples it received and the final classifier's on every sample, each equal to what a
separate computation of it gives."""

import pytest
import torch
from conftest import random_inputs, write_tiny_checkpoint

from hybridexit import codecs
from hybridexit.calibration.stats import collect_exit_stats
from hybridexit.data import Split
from hybridexit.model.checkpoint import load_model
from hybridexit.model.exits import entropy
from hybridexit.model.hybrid import CLOUD
from hybridexit.workflows import evaluate

N = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny hybrid whose exit threshold sends about half of the images to the cloud, and those images."""
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "ck", exits=(2,))
    model, _ = load_model(ckpt)
    x = random_inputs(N, seed=3)
    with torch.no_grad():
        thr = float(entropy(model(x.images)[0]).median())
    return ckpt, model, Split(x.images, x.labels, "test"), (thr,)


@pytest.fixture
def passes(monkeypatch):
    """Counts the passes over a split that the evaluation makes (its batches' progress bars)."""
    count = []
    real = evaluate.progress_batches

    def counting(*a, **k):
        count.append(1)
        return real(*a, **k)
    monkeypatch.setattr(evaluate, "progress_batches", counting)
    return count


def test_one_pass_gives_every_figure(setup, passes):
    ckpt, model, split, thr = setup
    ev = evaluate.evaluate_run(model, split, thr, batch_size=16)
    assert len(passes) == 1
    s = ev.summary
    stats = collect_exit_stats(model, split, 16)  # the whole network, every sample (what calibrate reads)
    preds, decided = stats.simulate(thr)
    assert 0 < s["exit_fraction"][0] < 1
    assert s["accuracy"] == stats.accuracy(preds)
    assert s["cloud_accuracy"] == stats.cloud_accuracy  # the final classifier on every sample
    off = decided == CLOUD
    want = int((stats.final_preds[off] == split.labels[off]).sum()) / int(off.sum())
    assert s["offloaded_accuracy"] == want  # the cloud's answers on the samples it received
    assert [d.prediction for d in ev.decisions] == preds.tolist() and ev.coded is None


def test_a_codec_rides_the_same_pass(setup, passes):
    ckpt, model, split, thr = setup
    plain = evaluate.evaluate_run(model, split, thr, batch_size=16).summary
    passes.clear()
    ev = evaluate.evaluate_run(model, split, thr, batch_size=16, codec="int8", checkpoint=ckpt)
    assert len(passes) == 1
    s, coded = ev.summary, ev.coded
    assert s["codec"] == "int8" and s["accuracy_without_codec"] == plain["accuracy"]
    assert s["cloud_accuracy"] == plain["cloud_accuracy"]  # the network as it is, without the codec
    assert [d.prediction for d in ev.decisions] == coded["predictions"].tolist()
    assert s["accuracy"] == sum(d.prediction == d.label for d in ev.decisions) / N
    # the codec's answers are those of its frames decoded by the receiver, one sample per frame
    want = evaluate.evaluate_codec(model, split, thr, codecs.get("int8"), ckpt, batch_size=7)
    assert want["predictions"].tolist() == coded["predictions"].tolist()
    assert want["payload_bytes"].tolist() == coded["payload_bytes"].tolist()
    off = want["decided_at"] == CLOUD
    assert bool((coded["payload_bytes"][off] > 0).all()) and bool((coded["payload_bytes"][~off] == 0).all())
    assert s["payload_bytes_per_offloaded"] == int(coded["payload_bytes"].sum()) / int(off.sum())


def test_several_codecs_share_one_pass(setup, passes):
    ckpt, model, split, thr = setup
    names = ("fp32", "fp16", "int8+zstd")
    run = evaluate.evaluate_split(model, split, thr, batch_size=16, plain=False,
                                  codecs={n: evaluate.WireCodec(codecs.get(n), ckpt) for n in names})
    assert len(passes) == 1 and run.plain is None and run.final is None
    for n in names:
        alone = evaluate.evaluate_codec(model, split, thr, codecs.get(n), ckpt)
        got = run.codec_figures(n)
        assert got["predictions"].tolist() == alone["predictions"].tolist()
        assert got["payload_bytes"].tolist() == alone["payload_bytes"].tolist()
    fp32 = run.codec_figures("fp32")
    feats = evaluate.offloaded_features(model, split, thr)
    assert len(feats) == len(run.remaining) and fp32["offloaded_accuracy"] == run.offloaded_accuracy("fp32")


def test_unlabelled_images_report_no_accuracy(setup):
    ckpt, model, split, thr = setup
    s = evaluate.evaluate_run(model, Split(split.images, torch.full((N,), -1), "images"), thr).summary
    assert s["accuracy"] is None and s["cloud_accuracy"] is None and s["offloaded_accuracy"] is None
