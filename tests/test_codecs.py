"""Feature codecs: round trips within their stated bounds, strict refusal of bad payloads, honest byte counts."""

import struct

import numpy as np
import pytest
import torch

from hybridexit import codecs, errors
from hybridexit.codecs.context import coding_steps
from hybridexit.runtime import wire
from hybridexit.workflows import evaluate
from hybridexit.workflows.train_codec import Bottleneck

FP = "0123456789abcdef"
SHAPE = (32, 8, 8)


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, *SHAPE, generator=g) * torch.linspace(0.2, 3.0, SHAPE[0])[None, :, None, None] + 0.3


@pytest.fixture(scope="module")
def learned_dir(tmp_path_factory, feats):
    """A checkpoint folder carrying a small learned codec: PCA-initialized bottleneck, tables from its symbols."""
    d = tmp_path_factory.mktemp("bn")
    torch.manual_seed(0)
    b = Bottleneck(SHAPE[0], 6, 2)
    b.init_pca(feats)
    b.eval()
    probs = codecs.ContextCoder.estimate(b.symbols(feats), b.levels)
    codecs.write_learned_codec(d, b, probs, SHAPE)
    return d


def _all_codecs(feats, learned_dir):
    out = [codecs.get(n) for n in ("fp32", "fp16", "int8", "fp32+zstd", "int8+zstd")]
    out += [codecs.get(f"q{b}", calibration=feats, clip_p=0.01) for b in (1, 2, 3, 4)]
    out.append(codecs.get("bn", checkpoint=learned_dir))
    return out


def test_every_codec_round_trips_within_its_bound(feats, learned_dir):
    for c in _all_codecs(feats, learned_dir):
        body = wire.frame(c, feats, FP)
        back = wire.decode(body, FP, (None, *SHAPE), codecs=codecs.held_codecs(learned_dir))
        err = (back - c.reference(feats)).abs()
        assert back.shape == feats.shape and back.dtype == torch.float32, c.name
        assert (err <= c.error_bound(feats)).all(), (c.name, float((err - c.error_bound(feats)).max()))
        if c.lossless:
            assert torch.equal(back, feats), c.name


def test_quantizer_bound_is_tight_and_values_outside_the_clip_are_clipped(feats):
    c = codecs.get("q2", calibration=feats, clip_p=0.05)
    back = c.decode(c.encode(feats), feats.shape)
    step = ((c.hi - c.lo) / 4)[None, :, None, None]
    inside = (feats >= c.lo[None, :, None, None]) & (feats <= c.hi[None, :, None, None])
    err = (back - feats).abs()
    assert (err[inside] <= (step / 2).expand_as(err)[inside] + 1e-5).all()
    assert err[inside].max() > 0.3 * float(step.min())  # a real quantizer, not a pass-through
    assert (back >= c.lo[None, :, None, None]).all() and (back <= c.hi[None, :, None, None]).all()


def test_learned_codec_symbols_round_trip_exactly_and_decode_equals_the_bottleneck(learned_dir, feats):
    c = codecs.get("bn", checkpoint=learned_dir)
    sym = c.bottleneck.symbols(feats).numpy()
    for s, p in zip(sym, c.encode(feats)):
        assert np.array_equal(c.coder.decode(p, s.shape), s)
    torch.testing.assert_close(c.decode(c.encode(feats), feats.shape), c.bottleneck(feats), rtol=0, atol=1e-5)


def test_context_coder_beats_the_raw_bits_on_correlated_symbols():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 4, (40, 3, 1, 1), generator=g).expand(40, 3, 8, 8).clone()  # constant maps
    noise = torch.rand(base.shape, generator=g) < 0.05
    sym = torch.where(noise, torch.randint(0, 4, base.shape, generator=g), base).to(torch.uint8)
    coder = codecs.ContextCoder(codecs.ContextCoder.estimate(sym, 4))
    raw_bytes = 3 * 8 * 8 * 2 / 8
    sizes = [len(coder.encode(s.numpy())) for s in sym]
    assert np.mean(sizes) < raw_bytes / 2


def test_frame_length_is_the_byte_count_and_payloads_are_per_sample(feats, learned_dir):
    for c in _all_codecs(feats, learned_dir):
        if isinstance(c, codecs.V1Codec):
            continue
        body = wire.frame(c, feats, FP)
        h = wire.parse_header(body)
        name = c.name.encode()
        payloads = c.encode(feats)
        assert h.sample_bytes == tuple(len(p) for p in payloads), c.name
        assert len(body) == 32 + 16 + 1 + len(name) + 2 + len(c.params()) + 2 * len(feats) + sum(h.sample_bytes)
        one = wire.frame(c, feats[:1], FP)  # what a batch-size-1 edge sends for the first sample
        assert len(one) == 32 + 16 + 1 + len(name) + 2 + len(c.params()) + 2 + len(payloads[0])


def _named_body(feats):
    c = codecs.get("q2", calibration=feats)
    return c, wire.frame(c, feats[:2], FP)


def test_named_frames_refuse_truncation_and_inconsistency(feats, learned_dir):
    c, body = _named_body(feats)
    cases = {
        "cut": (body[:-3], wire.TruncatedFrame),
        "trailing": (body + b"\0", wire.CorruptPayload),
        "flags": (body[:7] + b"\x01" + body[8:], wire.WireError),
        "dtype": (body[:24] + b"\x01" + body[25:], wire.WrongDtype),
    }
    b = bytearray(body)  # per-sample lengths that do not add up (frame length unchanged)
    at = 48 + 1 + 2 + 2 + len(c.params())
    n0, n1 = struct.unpack_from("<2H", b, at)
    struct.pack_into("<2H", b, at, n0 + 1, n1 - 1)
    cases["lengths moved"] = (bytes(b), wire.CorruptPayload)
    b = bytearray(body)
    struct.pack_into("<H", b, at, n0 + 5)
    cases["lengths too long"] = (bytes(b), wire.CorruptPayload)
    b = bytearray(body)
    b[48 + 1:48 + 3] = b"zz"  # unknown codec name
    cases["name"] = (bytes(b), wire.UnknownCodec)
    b = bytearray(body)
    b[len(body) - n0 - n1] ^= 0xFF  # the first sample's payload no longer starts as a zstd frame
    cases["payload"] = (bytes(b), wire.CorruptPayload)
    for _name, (bad, err) in cases.items():
        with pytest.raises(err):
            wire.decode(bad, FP, (None, *SHAPE))


def test_q_codec_refuses_bad_parameters(feats):
    c = codecs.get("q3", calibration=feats)
    p = c.params()
    with pytest.raises(wire.CorruptPayload):
        codecs.ClippedUniform.from_params(p[:-2])
    swapped = p[:4] + p[4 + 2 * SHAPE[0]:] + p[4:4 + 2 * SHAPE[0]]  # hi < lo
    with pytest.raises(wire.CorruptPayload):
        codecs.ClippedUniform.from_params(swapped)
    with pytest.raises(wire.UnknownCodec):
        codecs.ClippedUniform.from_params(b"\x09" + p[1:])
    with pytest.raises(wire.WrongShape):
        c.encode(torch.randn(1, SHAPE[0] + 1, 8, 8))


def test_learned_codec_refuses_another_codec_and_altered_payloads(feats, learned_dir, tmp_path):
    c = codecs.get("bn", checkpoint=learned_dir)
    body = wire.frame(c, feats[:1], FP)
    with pytest.raises(wire.UnknownCodec):  # the receiver's checkpoint has no learned codec
        wire.decode(body, FP)
    other = Bottleneck(SHAPE[0], 6, 2)
    other.init_pca(feats * 2)
    other.eval()
    codecs.write_learned_codec(tmp_path, other, codecs.ContextCoder.estimate(other.symbols(feats), 4), SHAPE)
    with pytest.raises(errors.CodecMismatch):
        wire.decode(body, FP, codecs=codecs.held_codecs(tmp_path))
    payload = c.encode(feats[:1])[0]
    for bad in (payload[:-4], payload + b"\0\0\0\0", payload[:-1]):
        with pytest.raises(wire.CorruptPayload):
            c.decode([bad], (1, *SHAPE))


def test_registry_refuses_unknown_names_and_missing_context(feats, tmp_path):
    for name in ("q5", "fp64", "bn+zstd", "q2+zstd"):
        with pytest.raises(wire.UnknownCodec):
            codecs.get(name, calibration=feats)
    with pytest.raises(errors.ConfigError):
        codecs.get("q2")
    with pytest.raises(errors.ConfigError):
        codecs.get("bn", checkpoint=tmp_path)


def test_every_codec_list_reads_the_registry(feats):
    """One spelling per codec: the CLI's --codec choices (evaluate, edge) are the registry's; each one builds; the
    deprecated --compress maps to NAME+zstd with a warning and is refused on a codec that codes its own payload."""
    import argparse

    from hybridexit.cli import build_parser
    from hybridexit.cli.options import codec_of

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in ("evaluate", "edge"):
        opt = next(a for a in sub.choices[cmd]._actions if "--codec" in a.option_strings)
        assert tuple(opt.choices) == codecs.CODEC_CHOICES and opt.help.startswith(codecs.CODEC_HELP)
    for name in codecs.CODEC_CHOICES:
        assert codecs.check_name(name) == name
        if name != codecs.LEARNED:
            base, zstd = codecs.frame_codec(name)
            assert codecs.get(name, calibration=feats).name.startswith(base) and zstd == name.endswith("+zstd")
    assert codecs.receivable({"bn": None}) == ["fp32", "fp16", "int8", "q1", "q2", "q3", "q4", "bn"]
    assert codec_of(argparse.Namespace(codec="q2", compress=False)) == "q2"
    with pytest.warns(FutureWarning, match="--codec int8\\+zstd"):
        assert codec_of(argparse.Namespace(codec="int8", compress=True)) == "int8+zstd"
    with pytest.raises(errors.ConfigError, match="fp32, fp16 and int8 only"):
        codec_of(argparse.Namespace(codec="bn", compress=True))


def test_v1_frames_are_unchanged(feats):
    """The original codecs still make version-1 frames the old decoder reads (header codec ids 1-3)."""
    for name, cid in (("fp32", 1), ("fp16", 2), ("int8", 3)):
        body = wire.frame(codecs.get(name), feats[:1], FP)
        assert body[6] == cid and body == wire.encode(feats[:1], FP, name)


# ---------------------------------------------------------------------------------------------- over the network
N_NET = 24


@pytest.fixture(scope="module")
def net_ckpts(tmp_path_factory):
    """A tiny ResNet-8 hybrid (exit at layer 2, features 32x16x16) and a copy of it that carries a learned codec."""
    import shutil

    from hybridexit.model.checkpoint import save_model
    from hybridexit.model.exits import entropy
    from hybridexit.model.hybrid import HybridNet
    from hybridexit.model.policy import ExitPolicy, write_policy
    from hybridexit.model.resnet import HybridConfig

    torch.manual_seed(0)
    cfg = HybridConfig(depth=8, num_classes=10, edge_layers=4, edge_bits=1, exits=(2,), mean=(0.5,) * 3, std=(0.25,) * 3)
    model = HybridNet(cfg)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_NET, 3, 32, 32), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
        for lin in [h.fc for h in model.exits.values()] + [model.head.fc]:
            lin.weight.normal_(0, 1.0)
        model.eval()
        thr = float(entropy(model(images)[0]).quantile(0.4))
    root = tmp_path_factory.mktemp("net")
    plain = root / "plain"
    save_model(plain, model, {"data": {"name": "cifar10", "mean": [0.5] * 3, "std": [0.25] * 3,
                                       "classes": [f"class{i}" for i in range(10)]}})
    write_policy(plain, ExitPolicy((thr,)))
    learned = root / "learned"
    shutil.copytree(plain, learned)
    edge, _ = model.split()
    with torch.no_grad():
        f = edge(images)
    b = Bottleneck(32, 6, 2)
    b.init_pca(f)
    b.eval()
    codecs.write_learned_codec(learned, b, codecs.ContextCoder.estimate(b.symbols(f), 4), (32, 16, 16))
    folder = root / "folder"  # the same codec added in a codec/ folder: the model stays plain's
    shutil.copytree(plain, folder)
    codecs.write_learned_codec(folder / codecs.CODEC_DIR, b, codecs.ContextCoder.estimate(b.symbols(f), 4), (32, 16, 16))
    return plain, learned, images, f, folder


def _server(checkpoint):
    from test_runtime import ThreadServer  # the runtime tests' real loopback server (tests/ is on sys.path)

    from hybridexit.runtime.server import ServerSettings

    return ThreadServer(checkpoint, ServerSettings())


@pytest.mark.parametrize("name", ["q2", "bn", "bn-folder", "fp32-folder"])
def test_edge_over_the_network_gives_the_in_process_records(net_ckpts, name):
    from hybridexit.data import Inputs, Split
    from hybridexit.model.checkpoint import load_model
    from hybridexit.model.records import Decision
    from hybridexit.runtime.client import EdgeOptions, run_edge

    plain, learned, images, f, folder = net_ckpts
    ckpt = {"bn": learned, "bn-folder": folder, "fp32-folder": folder}.get(name, plain)
    name = name.split("-")[0]
    labels = torch.arange(N_NET) % 10
    model, meta = load_model(ckpt)
    codec = codecs.get(name, checkpoint=ckpt, calibration=f)
    if ckpt == folder:  # the server of a checkpoint with a codec/ folder decodes bn and every other codec
        srv = _server(ckpt)
        try:
            import httpx

            assert "bn" in httpx.get(srv.url + "/v1/info").json()["codecs"]
        finally:
            srv.stop()
    want = evaluate.evaluate_codec(model, Split(images, labels, "test"), meta["policy"].thresholds, codec, ckpt)
    srv = _server(ckpt)
    try:
        summary, recs = run_edge(ckpt, Inputs(images, labels), EdgeOptions(srv.url, codec=name, batch_size=1),
                                 codec_calibration=f)
    finally:
        srv.stop()
    assert {r["decided_at"] for r in recs} == {"exit:0", "cloud"}
    assert [r["prediction"] for r in recs] == want["predictions"].tolist()
    assert [r["decided_at"] for r in recs] == [Decision.from_code(0, 0, int(d), ()).decided_at for d in want["decided_at"]]
    assert [r["payload_bytes"] for r in recs] == want["payload_bytes"].tolist()  # the frame is the byte count
    assert summary["payload_bytes_per_offloaded"] == pytest.approx(want["payload_bytes_per_offloaded"])
    assert summary["fallback_fraction"] == 0 and summary["codec"] == name


def test_a_cloud_behind_a_learned_codec_refuses_other_codecs(net_ckpts):
    import httpx

    plain, learned, images, f, folder = net_ckpts
    from hybridexit.model.checkpoint import fingerprint

    srv = _server(learned)
    try:
        fp = fingerprint(learned)
        r = httpx.post(srv.url + "/v1/infer", content=wire.encode(f[:1], fp, "fp32"))
        assert r.status_code == 409 and r.json()["error"] == "wrong_codec"
        ok = httpx.post(srv.url + "/v1/infer", content=wire.frame(codecs.get("bn", checkpoint=learned), f[:1], fp))
        assert ok.status_code == 200
        assert httpx.get(srv.url + "/v1/info").json()["codecs"] == ["bn"]
    finally:
        srv.stop()


def test_evaluate_command_reports_the_codec_and_the_link(net_ckpts, tiny_cifar, capsys):
    import json

    from hybridexit.cli import main

    plain, learned, images, f, folder = net_ckpts
    assert main(["evaluate", str(plain), "--data-dir", str(tiny_cifar), "--limit", "12", "--codec", "int8+zstd",
                 "--link", "ble", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["codec"] == "int8+zstd" and d["raw_image_bytes"] == 3072
    off = round(12 * (1 - d["edge_fraction"]))
    if off:
        assert d["payload_bytes_per_input"] == pytest.approx(d["payload_bytes_per_offloaded"] * off / 12)
        assert d["transmit_uj"] == pytest.approx(d["payload_bytes_per_input"] * 8 * 0.153)
    assert d["edge_total_uj"] == pytest.approx(d["link"]["edge_compute_uj"] + d["transmit_uj"])
    assert d["accuracy_without_codec"] is not None
    assert main(["evaluate", str(learned), "--data-dir", str(tiny_cifar), "--limit", "4", "--codec", "fp32"]) == 2
    assert "use --codec bn" in capsys.readouterr().err


def test_the_edge_stops_at_start_when_the_cloud_cannot_decode_its_codec(net_ckpts):
    from hybridexit.data import Inputs
    from hybridexit.runtime.client import EdgeOptions, run_edge
    from hybridexit.runtime.transport import CloudRejected

    plain, learned, images, f, folder = net_ckpts
    srv = _server(learned)
    try:
        with pytest.raises(CloudRejected, match="decodes the codecs bn"):
            run_edge(learned, Inputs(images[:2], torch.zeros(2, dtype=torch.long)),
                     EdgeOptions(srv.url, codec="int8", on_cloud_failure="fallback"))
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- coders
@pytest.mark.parametrize("hw", [(16, 16), (8, 8), (5, 7), (1, 1), (32, 32), (3, 16)])
def test_coding_steps_cover_the_grid_once_each_after_its_neighbours(hw):
    h, w = hw
    known = np.zeros(h * w + 1, bool)
    known[h * w] = True  # "no neighbour"
    for pos, nbr in coding_steps(h, w):
        assert not known[pos].any() and known[nbr].all()  # new positions, contexts already decoded
        known[pos] = True
    assert known.all()
    if hw == (16, 16):
        assert len(coding_steps(h, w)) == 5


def _correlated_symbols(n=40, c=3, h=8, w=8, levels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, levels, (n, c, 1, 1), generator=g).expand(n, c, h, w).clone()
    noise = torch.rand(base.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, levels, base.shape, generator=g), base).to(torch.uint8)


def _serial_reference_encode(probs: np.ndarray, sym: np.ndarray) -> bytes:
    """The first learned codecs' encoder as it was written: one constriction call per anti-diagonal."""
    import constriction

    c, h, w = sym.shape
    levels = probs.shape[2]
    s = torch.from_numpy(sym.astype(np.int64))
    up, left = torch.full_like(s, levels), torch.full_like(s, levels)
    up[..., 1:, :], left[..., :, 1:] = s[..., :-1, :], s[..., :, :-1]
    ctx = (up * (levels + 1) + left).numpy()
    enc = constriction.stream.queue.RangeEncoder()
    model = constriction.stream.model.Categorical(perfect=False)
    for d in range(h + w - 1):
        ys = np.arange(max(0, d - w + 1), min(h, d + 1))
        xs = d - ys
        p = probs[np.arange(c)[:, None], ctx[:, ys, xs]].reshape(-1, levels)
        enc.encode(sym[:, ys, xs].reshape(-1).astype(np.int32), model, p)
    return enc.get_compressed().tobytes()


def test_format_1_codecs_keep_their_bytes_and_still_load(tmp_path, feats):
    """The first codecs' checkpoints (format 1) code exactly as before, now in one call, and decode back."""
    from safetensors.torch import save_file

    sym = _correlated_symbols()
    probs = codecs.SerialContextCoder.estimate(sym, 4)
    coder = codecs.SerialContextCoder(probs)
    for s in sym[:10].numpy():
        data = coder.encode(s)
        assert data == _serial_reference_encode(probs.numpy(), s)
        assert np.array_equal(coder.decode(data, s.shape), s)
    with pytest.raises(wire.CorruptPayload):
        coder.decode(data + b"\0\0\0\0", s.shape)
    torch.manual_seed(0)
    b = Bottleneck(SHAPE[0], 6, 2).eval()
    b.init_pca(feats)
    tensors = {f"bottleneck.{k}": v.contiguous() for k, v in b.state_dict().items()}
    tensors["coder.probs"] = codecs.SerialContextCoder.estimate(b.symbols(feats), 4)
    save_file(tensors, str(tmp_path / codecs.CODEC_TENSORS))
    (tmp_path / codecs.CODEC_FILE).write_text(
        '{"format": 1, "name": "bn", "bottleneck": {"channels": 32, "code_channels": 6, "bits": 2}, '
        '"feature_shape": [32, 8, 8]}')
    c = codecs.get("bn", checkpoint=tmp_path)
    assert c.format == 1 and c.params()[0] == 1 and isinstance(c.coder, codecs.SerialContextCoder)
    back = wire.decode(wire.frame(c, feats, FP), FP, (None, *SHAPE), codecs=codecs.held_codecs(tmp_path))
    torch.testing.assert_close(back, c.reference(feats), rtol=0, atol=1e-5)


def test_payloads_are_canonical_and_altered_ones_are_refused():
    sym = _correlated_symbols(n=60, c=4, h=16, w=16, levels=8, seed=3)
    coder = codecs.ContextCoder(codecs.ContextCoder.estimate(sym, 8).half())
    rng = np.random.default_rng(0)
    refused = tried = 0
    for s in sym.numpy():
        data = coder.encode(s)
        assert data[-4:] != b"\0\0\0\0" and np.array_equal(coder.decode(data, s.shape), s)
        bad = bytearray(data)
        bad[rng.integers(len(bad))] ^= 1 << int(rng.integers(8))
        tried += 1
        try:
            refused += not np.array_equal(coder.decode(bytes(bad), s.shape), s)
        except wire.CorruptPayload:
            refused += 1
    assert refused == tried  # every one-bit change decodes to other symbols, and (all but 1 in 256) is refused
    with pytest.raises(wire.WrongShape):
        coder.encode(sym[0, :3].numpy())


def test_a_codec_folder_adds_the_codec_to_an_unchanged_checkpoint(net_ckpts, tiny_cifar, capsys):
    """A checkpoint's codec/ folder: the checkpoint keeps its cloud half, reads every codec, and also bn."""
    from hybridexit.cli import main

    plain, learned, images, f, folder = net_ckpts
    assert codecs.required_codec(folder) is None and list(codecs.held_codecs(folder)) == ["bn"]
    assert codecs.codec_home(folder) == folder / codecs.CODEC_DIR and codecs.codec_home(learned) == learned
    assert codecs.codec_home(plain) is None and codecs.held_codecs(plain) == {}
    for name in ("fp32", "bn"):
        assert main(["evaluate", str(folder), "--data-dir", str(tiny_cifar), "--limit", "12", "--codec", name,
                     "--json"]) == 0
        assert json_out(capsys)["codec"] == name


def json_out(capsys):
    import json

    return json.loads(capsys.readouterr().out)
