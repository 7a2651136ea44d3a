"""``hybridexit edge --resume`` (issue 39): after the edge process is killed mid-run, resuming yields each input
exactly once, with the answers an uninterrupted run gives; a cut last line is dropped, other files are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import write_tiny_checkpoint

from hybridexit.data import load_cifar
from hybridexit.model.checkpoint import load_model, split_of
from hybridexit.model.hybrid import conditional_inference
from hybridexit.runtime.process import ServerProcess
from hybridexit.runtime.resume import ResumeError, read_done

N = 30


def _edge(ckpt, url, data, out, *extra):
    cmd = [sys.executable, "-m", "hybridexit.cli", "edge", str(ckpt), "--cloud", url, "--data-dir", str(data),
           "--split", "test", "--limit", str(N), "--out", str(out), "--threads", "1", "--engine", "torch", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ,
                                                                                      "PYTHONWARNINGS": "ignore"})


def _lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_resume_after_a_killed_edge_gives_each_input_exactly_once(tmp_path, tiny_cifar):
    ckpt = write_tiny_checkpoint(tmp_path / "ck")  # untrained: no input exits, every one goes to the cloud
    out = tmp_path / "records.jsonl"
    # a lone request waits 100 ms for others to join its batch: 30 inputs take about 3 s
    with ServerProcess(ckpt, ["--threads", "1", "--max-wait-ms", "100"]) as srv:
        p = _edge(ckpt, srv.url, tiny_cifar, out)
        t_end = time.monotonic() + 120
        while _lines(out) < 8:
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < t_end, "the edge wrote no records"
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        killed_at = _lines(out)
        assert 8 <= killed_at < N
        p = _edge(ckpt, srv.url, tiny_cifar, out, "--resume", "--json")
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr.decode()
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(N))  # each input exactly once, in order
    assert json.loads(stdout.decode().strip().splitlines()[-1])["inputs"] == N
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_cifar("cifar10", tiny_cifar, download_ok=False)
    test = split_of(ckpt, ds, "test").limit(N)
    model, meta = load_model(ckpt)
    edge, cloud = model.eval().split()
    want = conditional_inference(edge, cloud, test.images, meta["policy"].thresholds)
    assert [r["prediction"] for r in recs] == want.predictions.tolist()
    assert [r["label"] for r in recs] == test.labels.tolist()


def test_read_done_drops_a_cut_line_and_refuses_other_files(tmp_path):
    labels = torch.tensor([3, 1, 4, 1, 5])
    out = tmp_path / "r.jsonl"
    good = [json.dumps({"index": i, "label": int(labels[i]), "prediction": 0, "decided_at": "cloud"})
            for i in range(3)]
    out.write_text("\n".join(good) + "\n" + '{"index": 3, "lab')
    assert [r["index"] for r in read_done(out, labels)] == [0, 1, 2]
    assert out.read_text() == "\n".join(good) + "\n"  # the cut record is gone: input 3 runs again
    assert read_done(tmp_path / "none.jsonl", labels) == []
    bad = {
        "not an edge record": "\n".join(good[:1] + ["[1, 2]"]) + "\n",
        "expected 1": "\n".join(good[:1] + good[2:3]) + "\n",
        "other inputs": json.dumps({"index": 0, "label": 9, "prediction": 0, "decided_at": "cloud"}) + "\n",
        "more inputs": "\n".join(good) + "\n",
    }
    for why, text in bad.items():
        out.write_text(text)
        with pytest.raises(ResumeError, match=why):
            read_done(out, labels[:2] if why == "more inputs" else labels)


def test_cli_refuses_resume_without_out_and_a_bad_target_in_one_line(tmp_path, tiny_cifar, capsys):
    from hybridexit.cli import main

    ckpt = write_tiny_checkpoint(tmp_path / "ck")
    base = ["edge", str(ckpt), "--cloud", "http://127.0.0.1:9", "--data-dir", str(tiny_cifar), "--limit", "2"]
    assert main([*base, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--resume" in err[-1] and "--out" in err[-1] and "Traceback" not in "".join(err)
    assert main([*base, "--slo-ms", "-5"]) == 2
    assert "--slo-ms" in capsys.readouterr().err
