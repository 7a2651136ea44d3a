"""hybridexit-edge (edge/): the edge without torch. Its wheel is built from this checkout (the kernels' torch-free
core in src/hybridexit/engines/csrc, compiled by setup.py) and installed into a fresh venv without torch; there it
runs an exported edge against a real ``hybridexit serve`` on loopback, and its records are compared with the main
package's edge on the packed engine (``run_edge``, what ``hybridexit edge --engine packed`` runs): identical
decisions, predictions, entropies and payload bytes.

Cost: the wheel (one C++ build, ~15 s) is cached per source hash and the dependency wheels (numpy, safetensors)
are fetched from PyPI once, both under ``~/.cache/hybridexit/edge-package`` (``$HYBRIDEXIT_EDGE_CACHE``); the
venv itself is made fresh every run (a few seconds). Without network and without cached wheels the venv tests skip
and say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoint

from hybridexit.data import Inputs
from hybridexit.engines.export import export_checkpoint
from hybridexit.engines.packed import PackedEdge as TorchPacked
from hybridexit.runtime import wire
from hybridexit.runtime.client import EdgeOptions, run_edge
from hybridexit.runtime.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
EDGE = ROOT / "edge"
sys.path.insert(0, str(ROOT / "scripts"))
from edge_venv import make_edge_venv  # noqa: E402

TOKEN = "edge-package-token-0123456789"
COMPARED = ("index", "label", "prediction", "decided_at", "entropies", "payload_bytes", "prediction_name",
            "label_name", "engine")


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    return make_edge_venv(tmp_path_factory.mktemp("edge-venv") / "venv")


def _run(venv: Path, *args, env=None):
    return subprocess.run([str(venv / "bin" / "hybridexit-edge"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny binary checkpoint with two exits, its packed export, 48 inputs and thresholds (from the packed engine's
    own entropies) that send some inputs out at each exit and the rest to the cloud."""
    d = tmp_path_factory.mktemp("edge-export")
    ck = write_tiny_checkpoint(d / "ck", exits=(2, 4), thresholds=(1.0, 1.0))
    export_checkpoint(ck, "packed", d / "edge")
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(48) % 10
    e = TorchPacked.load(d / "edge" / "edge.packed.safetensors").decide(images, (0.0, 0.0)).entropies  # none exit
    t0 = float(e[:, 0].quantile(0.3))
    t1 = float(e[e[:, 0] >= t0, 1].quantile(0.5))
    np.savez(d / "inputs.npz", images=images.numpy(), labels=labels.numpy())
    return ck, d / "edge", Inputs(images, labels), d / "inputs.npz", (t0, t1)


def test_the_venv_has_no_torch_and_no_numpy(edge_venv):
    for mod in ("torch", "numpy"):
        r = subprocess.run([str(edge_venv / "bin" / "python"), "-c", f"import {mod}"], capture_output=True, text=True)
        assert r.returncode != 0 and f"No module named '{mod}'" in r.stderr
    r = _run(edge_venv, "info")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch"] in ("x86_64", "aarch64")


@pytest.fixture(scope="module")
def cloud(exported):
    """``hybridexit serve`` on the checkpoint, in its own process, on a loopback port, with a token."""
    with ServerProcess(exported[0], ["--threads", "1"], env={"HYBRIDEXIT_TOKEN": TOKEN}) as srv:
        yield srv.url


@pytest.mark.parametrize("codec,batch", [("fp32", 1), ("int8", 4)])
def test_records_equal_hybridexit_edge_on_the_packed_engine(edge_venv, exported, cloud, tmp_path, codec, batch):
    ck, art, inputs, npz, thr = exported
    s_main, ref = run_edge(ck, inputs, EdgeOptions(cloud, token=TOKEN, engine="packed", codec=codec, batch_size=batch,
                                                   thresholds=thr))
    r = _run(edge_venv, "run", art, "--cloud", cloud, "--inputs", npz, "--out", tmp_path / "r.jsonl", "--codec", codec,
             "--batch-size", batch, "--thresholds", *thr, "--json", env={"HYBRIDEXIT_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    routes = {x["decided_at"] for x in ref}
    assert {"exit:0", "exit:1", "cloud"} <= routes, routes  # every route is exercised
    assert [{k: x.get(k) for k in COMPARED} for x in got] == [{k: x.get(k) for k in COMPARED} for x in ref]
    s = json.loads(r.stdout)
    for key in ("n", "accuracy", "exit_fraction", "cloud_fraction", "fallback_fraction", "expected_uj", "reduction",
                "payload_bytes_per_input", "payload_bytes_per_offloaded", "requests", "failed_requests", "thresholds"):
        assert s[key] == pytest.approx(s_main[key]), key


def test_cloud_down_falls_back_as_hybridexit_edge(edge_venv, exported, tmp_path):
    ck, art, inputs, npz, thr = exported
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    opts = dict(retries=0, timeout_s=2.0)
    with pytest.warns(UserWarning):
        _, ref = run_edge(ck, inputs.head(12), EdgeOptions(url, engine="packed", thresholds=thr, **opts))
    r = _run(edge_venv, "run", art, "--cloud", url, "--inputs", npz, "--limit", 12, "--out", tmp_path / "r.jsonl",
             "--thresholds", *thr, "--retries", 0, "--timeout-s", 2)
    assert r.returncode == 0 and "fall back" in r.stderr, r.stderr
    got = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    keys = ("index", "prediction", "decided_at", "entropies", "payload_bytes")
    assert [{k: x[k] for k in keys} for x in got] == [{k: x[k] for k in keys} for x in ref]
    assert any(x["decided_at"] == "fallback" for x in got)


def test_bad_input_is_one_line(edge_venv, exported, tmp_path):
    _, art, _, npz, _ = exported
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    r = _run(edge_venv, "run", art, "--cloud", "http://127.0.0.1:9", "--inputs", tmp_path / "bad.npz")
    assert r.returncode == 2 and r.stderr.startswith("hybridexit-edge: error:") and len(r.stderr.splitlines()) == 1
    r = _run(edge_venv, "run", tmp_path, "--cloud", "http://127.0.0.1:9", "--inputs", npz)
    assert r.returncode == 2 and "export" in r.stderr and "Traceback" not in r.stderr
    r = _run(edge_venv, "run", art, "--cloud", "http://127.0.0.1:9", "--inputs", tmp_path / "bad.npz", "--codec", "bn")
    assert r.returncode == 2 and "fp32, fp16 or int8" in r.stderr


@pytest.fixture
def edge_library(edge_venv, monkeypatch):
    """hybridexit_edge importable here, on the library the fresh venv built (this process has torch: the reference)."""
    (lib,) = edge_venv.glob("lib/python*/site-packages/hybridexit_edge/libhx_edge.so")
    monkeypatch.setenv("HX_EDGE_LIB", str(lib))
    monkeypatch.syspath_prepend(str(EDGE))
    from hybridexit_edge import native

    native.lib.cache_clear()
    yield
    native.lib.cache_clear()


@pytest.mark.parametrize("option", ["all-k2", "global", "2-bit-options"])
def test_every_option_decides_as_the_packed_engine(edge_library, option, tmp_path):
    from hybridexit_edge.artifact import PackedEdge
    from test_engines_packed import OPTION_NETS, _random_binary_net, _randomize_options, _thresholds

    from hybridexit.model.checkpoint import save_model

    model = _random_binary_net(seed=11, **OPTION_NETS[option])
    _randomize_options(model, torch.Generator().manual_seed(12))
    save_model(tmp_path / "ck", model, {"data": {"name": "cifar10"}})
    export_checkpoint(tmp_path / "ck", "packed", tmp_path / "edge")
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(13))
    thr = _thresholds(model.split()[0], x)
    ref = TorchPacked.load(tmp_path / "edge" / "edge.packed.safetensors").decide(x, thr)
    got = PackedEdge(tmp_path / "edge").decide(x.numpy().tobytes(), thr)
    assert set(got.decided_at) == {-1, 0, 1}
    for name in ("predictions", "decided_at", "remaining"):
        assert getattr(got, name) == getattr(ref, name).tolist(), name
    assert np.array_equal(np.array(got.entropies, dtype=np.float32), ref.entropies.numpy(), equal_nan=True)
    c, h, w = ref.features.shape[1:]
    feats = np.ctypeslib.as_array(got.features)[: len(got.remaining) * c * h * w].reshape(-1, h, w, c)
    assert np.array_equal(feats.transpose(0, 3, 1, 2), ref.features.numpy())


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 65520 -> inf in fp16, on purpose
@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
def test_frames_are_byte_identical_to_wire_encode(edge_library, codec):
    from hybridexit_edge import frames, native

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 5, 5, generator=g) * torch.logspace(-3, 2, 8).view(1, 8, 1, 1)
    x[1, 2] = 0.0
    x[2, 3, 0, :4] = torch.tensor([6.1035e-05, 3.0e-08, 65520.0, -1e-7])  # fp16 subnormals, overflow, rounding
    nhwc = native.floats(x.permute(0, 2, 3, 1).flatten().tolist())
    assert frames.encode(nhwc, 3, (8, 5, 5), "0123456789abcdef", codec) == wire.encode(x, "0123456789abcdef", codec)
