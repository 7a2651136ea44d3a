"""The binary-edge recipe options of issue 21 (docs/recipes.md): ApproxSign, RSign, RPReLU, exit capacity, two-stage
training; their energy; and that with every option off a network, its config and its checkpoint are unchanged."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridexit import ConfigError, HybridConfig
from hybridexit.cli import build_parser
from hybridexit.engines import available_engines, get_engine, unsupported_options
from hybridexit.errors import EngineError
from hybridexit.model.checkpoint import fingerprint, load_model, read_tensors, save_model
from hybridexit.model.energy import EnergyTable, count_layers, energy_report
from hybridexit.model.hybrid import HybridNet
from hybridexit.model.quant import BNQuantConv, ChannelShift, QuantConv2d, RPReLU, quantize_activation, set_float_weights
from hybridexit.model.resnet import EXIT_POOLS, block_specs
from hybridexit.workflows.recipes import load_recipe, read_recipe
from hybridexit.workflows.train import TrainConfig, _phases, build_model, train

ROOT = Path(__file__).resolve().parents[1]
EDGE = dict(depth=8, edge_layers=4, edge_bits=1, exits=(2, 4))
ALL = dict(act_shift=True, rprelu=True, ste="approx", exit_hidden=16, exit_pool="k2")


def images(n=6, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- the straight-through estimators -------------------------------------------------------------------------

def test_approx_sign_gradient_is_its_formula():
    x = torch.linspace(-1.5, 1.5, 301, requires_grad=True)
    y = quantize_activation(x, 1, "approx")
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0))
    y.backward(torch.full_like(x, 3.0))
    want = 3.0 * torch.where(x.abs() <= 1, 2 - 2 * x.abs(), torch.zeros_like(x))
    assert torch.allclose(x.grad, want, atol=1e-6)
    # the clipped estimator is 1 on |x| <= 1: another gradient
    xc = x.detach().clone().requires_grad_()
    quantize_activation(xc, 1, "clip").sum().backward()
    assert torch.equal(xc.grad, (xc.abs() <= 1).float())
    assert not torch.allclose(x.grad / 3, xc.grad)


def test_ste_option_reaches_the_edge_and_changes_gradients_only():
    torch.manual_seed(0)
    clip = HybridNet(HybridConfig(**EDGE)).train()
    approx = HybridNet(HybridConfig(**EDGE, ste="approx")).train()
    approx.load_state_dict(clip.state_dict())
    x = images()
    out_c, out_a = clip(x), approx(x)
    for a, b in zip(out_c, out_a):
        assert torch.equal(a, b)  # same forward
    sum(o.sum() for o in out_c).backward()
    sum(o.sum() for o in out_a).backward()
    g_c, g_a = clip.blocks[0].c1.bn.weight.grad, approx.blocks[0].c1.bn.weight.grad
    assert not torch.allclose(g_c, g_a)  # a different gradient reaches the layers before a sign
    assert torch.equal(clip.blocks[-1].c1.bn.weight.grad, approx.blocks[-1].c1.bn.weight.grad)  # float cloud block
    with pytest.raises(ConfigError, match="edge_bits=1"):
        HybridConfig(depth=8, edge_layers=4, edge_bits=4, ste="approx")
    with pytest.raises(ConfigError, match="ste"):
        HybridConfig(**EDGE, ste="smooth")


# ---- RSign and RPReLU -------------------------------------------------------------------------------------------

def test_rsign_and_rprelu_compute_their_formulas():
    torch.manual_seed(0)
    q = BNQuantConv(4, 6, 1, bits=1, act_shift=True, rprelu=True).eval()
    with torch.no_grad():
        q.shift.bias.copy_(torch.tensor([0.5, -0.3, 0.0, 1.0]))
        q.rprelu.shift_in.copy_(torch.linspace(-1, 1, 6))
        q.rprelu.slope.copy_(torch.linspace(-0.5, 2, 6))
        q.rprelu.shift_out.copy_(torch.linspace(0.2, -0.2, 6))
    x = torch.randn(3, 4, 5, 5)
    a = torch.where(q.bn(x) - q.shift.bias.view(1, -1, 1, 1) >= 0, 1.0, -1.0)
    w = torch.sign(q.conv.weight) * q.conv.weight.abs().mean(dim=(1, 2, 3), keepdim=True)
    c = F.conv2d(a, w, padding=1) - q.rprelu.shift_in.view(1, -1, 1, 1)
    want = torch.where(c >= 0, c, q.rprelu.slope.view(1, -1, 1, 1) * c) + q.rprelu.shift_out.view(1, -1, 1, 1)
    assert torch.allclose(q(x), want, atol=1e-5)


def test_rsign_and_rprelu_parameters_are_learned():
    torch.manual_seed(0)
    model = HybridNet(HybridConfig(**EDGE, act_shift=True, rprelu=True)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".shift." in k or ".rprelu." in k}
    assert len(before) == 4 * 4  # 2 blocks x 2 convs: one shift, three RPReLU tensors each
    y = torch.randint(0, 10, (6,))
    for _ in range(3):
        opt.zero_grad()
        sum(F.cross_entropy(o, y) for o in model(images())).backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        assert not torch.equal(after[k], v), f"{k} did not move"
    # only the quantized edge convs carry them
    assert all(k.startswith("blocks.0.") or k.startswith("blocks.1.") for k in before)


def test_options_need_a_quantized_edge():
    for kw in (dict(act_shift=True), dict(rprelu=True)):
        with pytest.raises(ConfigError, match="quantized edge"):
            HybridConfig(depth=8, **kw)
        with pytest.raises(ConfigError, match="quantized edge"):
            HybridConfig(depth=8, edge_layers=4, edge_bits=32, **kw)
    with pytest.raises(ConfigError, match="true or false"):
        HybridConfig(**EDGE, act_shift="yes")
    with pytest.raises(ConfigError, match="exit_hidden"):
        HybridConfig(**EDGE, exit_hidden=-1)


# ---- exit capacity ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", EXIT_POOLS)
def test_exit_pool_and_hidden_width(pool):
    cfg = HybridConfig(**EDGE, exit_pool=pool, exit_hidden=24)
    model = HybridNet(cfg).train()
    outs = model(images())
    assert [tuple(o.shape) for o in outs] == [(6, 10)] * 3
    sum(o.sum() for o in outs).backward()
    head = model.exits["2"]
    assert head.hidden[0].weight.grad.abs().sum() > 0 and head.hidden[1].weight.grad is not None
    size = 32 if pool == "global" else 32 // int(pool[1:])
    want_in = 16 * (1 if pool == "global" else size * size)
    assert head.hidden[0].in_features == want_in and head.fc.in_features == 24
    assert build_parser().parse_args(["summary", "--edge-layers", "4", "--exit-pool", pool]).exit_pool == pool


# ---- defaults: the plain network, its config and its checkpoint are unchanged -------------------------------------

def test_defaults_are_the_plain_layers_and_config(tmp_path):
    cfg = HybridConfig(**EDGE)
    assert cfg == HybridConfig(**EDGE, act_shift=False, rprelu=False, ste="clip", exit_hidden=0)
    d = cfg.to_dict()
    assert not {"act_shift", "rprelu", "ste", "exit_hidden"} & set(d)  # configs written as before the options
    assert HybridConfig.from_dict(d) == cfg
    model = HybridNet(cfg)
    assert not any(isinstance(m, (ChannelShift, RPReLU)) for m in model.modules())
    assert all(head.hidden is None for head in model.exits.values())
    # a plain quantized conv is BatchNorm -> sign -> alpha * sign(W) conv, bit for bit; in eval mode the sum of
    # signs is taken first and scaled once (quant.quantized_conv_exact), in training the conv of alpha * sign(W)
    q = model.blocks[0].c1.eval()
    x = torch.randn(2, 16, 32, 32)
    alpha = q.conv.weight.abs().mean(dim=(1, 2, 3), keepdim=True)
    signs = torch.where(q.conv.weight >= 0, 1.0, -1.0)
    with torch.no_grad():
        a = torch.where(q.bn(x) >= 0, 1.0, -1.0)
        assert torch.equal(q(x), F.conv2d(a, signs, padding=1) * alpha.view(1, -1, 1, 1))
        q.train()
        q.bn.eval()  # running statistics, as above
        assert torch.equal(q(x), F.conv2d(a, signs * alpha, padding=1))
    q.eval()
    # a set option is written, read back, and changes the fingerprint; the default one does not
    save_model(tmp_path / "plain", model.eval(), {})
    fp = fingerprint(tmp_path / "plain")
    assert "act_shift" not in json.loads((tmp_path / "plain" / "config.json").read_text())["network"]
    reloaded, _ = load_model(tmp_path / "plain")
    x = images()
    for a, b in zip(model(x), reloaded(x)):
        assert torch.equal(a, b)
    fancy = HybridNet(cfg.replace(**ALL)).eval()
    save_model(tmp_path / "fancy", fancy, {})
    loaded, _ = load_model(tmp_path / "fancy")
    assert loaded.cfg == cfg.replace(**ALL) and fingerprint(tmp_path / "fancy") != fp
    for a, b in zip(fancy(x), loaded(x)):
        assert torch.equal(a, b)


def test_options_start_as_identity_from_a_plain_checkpoint(tmp_path):
    """RSign and RPReLU are absent from a plain checkpoint: ``--init`` loads it, they start as the identity."""
    torch.manual_seed(1)
    plain = HybridNet(HybridConfig(**EDGE)).eval()
    save_model(tmp_path / "plain", plain, {})
    model = build_model(HybridConfig(**EDGE, act_shift=True, rprelu=True),
                        TrainConfig(epochs=1, init=str(tmp_path / "plain"))).eval()
    x = images()
    for a, b in zip(plain(x), model(x)):
        assert torch.equal(a, b)


# ---- energy --------------------------------------------------------------------------------------------------------

def _edge_conv_elements(cfg):
    """(input elements, output elements) of the quantized edge convs for one image, from the block shapes."""
    ins = outs = 0
    for s in block_specs(cfg)[: cfg.edge_blocks]:
        ins += s.in_ch * s.in_size**2 + s.out_ch * s.out_size**2
        outs += 2 * s.out_ch * s.out_size**2
    return ins, outs


def test_energy_counts_the_options_exactly():
    t = EnergyTable()
    base_cfg = HybridConfig(depth=32, edge_layers=20, edge_bits=1, exits=(20,))
    base = energy_report(base_cfg, t)
    ins, outs = _edge_conv_elements(base_cfg)
    expect = {
        "act_shift": ins * t.add32_pj / 1e6,  # one add per input element of each binary conv
        "rprelu": outs * (t.add32_pj + t.mac32_pj) / 1e6,  # one add and one MAC per output element
        "ste": 0.0,  # gradients only
    }
    for opt, delta in expect.items():
        val = {"act_shift": True, "rprelu": True, "ste": "approx"}[opt]
        r = energy_report(base_cfg.replace(**{opt: val}), t)
        assert r.edge_uj - base.edge_uj == pytest.approx(delta, rel=1e-9, abs=1e-12), opt
        assert r.exit_path_uj[0] - base.exit_path_uj[0] == pytest.approx(delta, rel=1e-9, abs=1e-12), opt
        assert (r.cloud_uj, r.fp32_uj) == (base.cloud_uj, base.fp32_uj)
        assert r.edge_macs_by_bits[1] == base.edge_macs_by_bits[1]
    kinds = {r.kind for r in count_layers(HybridNet(base_cfg.replace(act_shift=True, rprelu=True)))}
    assert {"shift", "rprelu"} <= kinds
    # exit head: 32 channels x 5 x 5 after k3 at layer 20; a hidden layer of 64 replaces 800 x 10 by 800 x 64 + 64 x 10
    r = energy_report(base_cfg.replace(exit_hidden=64), t)
    assert r.exit_path_uj[0] - base.exit_path_uj[0] == pytest.approx((800 * 64 + 64 * 10 - 800 * 10) * t.mac32_pj / 1e6)
    assert r.cloud_uj == base.cloud_uj
    r = energy_report(base_cfg.replace(exit_pool="k2"), t)  # 32 x 8 x 8 = 2048 inputs instead of 800
    assert r.exit_path_uj[0] - base.exit_path_uj[0] == pytest.approx((2048 - 800) * 10 * t.mac32_pj / 1e6)


def test_energy_rows_are_found_by_type_not_name():
    model = HybridNet(HybridConfig(**EDGE, rprelu=True))
    q = model.blocks[0].c1
    q.renamed = q.rprelu  # the same module under another name: still counted once, as an RPReLU
    del q.rprelu
    q.rprelu = None
    q.forward = lambda x: q.renamed(q.conv(q.act(q.bn(x))))
    rows = [r for r in count_layers(model) if r.kind == "rprelu"]
    assert len(rows) == 4 and any(r.name.endswith("renamed") for r in rows)


# ---- engines refuse what they do not compute ---------------------------------------------------------------------

def test_every_engine_offers_every_option():
    """Since issue 34 no engine refuses a recipe option: the packed kernels fold RSign into the packing threshold
    and RPReLU into the conv epilogue, the onnx graph has them as nodes (tests/test_engines_*.py check the
    decisions); only what an engine cannot run at all is left out (packed: no 8-bit edges)."""
    for kw in (dict(act_shift=True), dict(rprelu=True), dict(exit_hidden=8), dict(exit_pool="k2")):
        cfg = HybridConfig(**EDGE, **kw)
        assert unsupported_options(cfg, "onnx") == unsupported_options(cfg, "packed") == []
    assert "packed" not in available_engines(HybridConfig(**{**EDGE, "edge_bits": 8}))
    with pytest.raises(EngineError, match="8-bit"):
        get_engine("packed", HybridNet(HybridConfig(**{**EDGE, "edge_bits": 8})).eval().split()[0])


def test_packed_engine_runs_wider_exits_as_torch():
    """The packed engine runs its exits as torch modules: any pool and hidden width decide as the torch edge."""
    pytest.importorskip("hybridexit.engines.native").kernels()
    torch.manual_seed(0)
    model = HybridNet(HybridConfig(**EDGE, exit_hidden=16, exit_pool="k2")).train()
    for seed in range(3):  # BatchNorm statistics away from their initial values
        model(images(32, seed))
    edge, _ = model.eval().split()
    assert "packed" in available_engines(edge.cfg)
    x = images(64, 7)
    want, got = edge.decide(x, (0.5, 1.0)), get_engine("packed", edge).decide(x, (0.5, 1.0))
    assert torch.equal(want.decided_at, got.decided_at) and torch.equal(want.predictions, got.predictions)
    assert torch.allclose(want.entropies.nan_to_num(-1), got.entropies.nan_to_num(-1), atol=1e-5)


# ---- two-stage training ----------------------------------------------------------------------------------------

def two_stage(**kw):
    base = dict(stage1_epochs=1, epochs=1, batch_size=32, val_size=40, lr=0.05, warmup_epochs=0.0)
    return TrainConfig(**{**base, **kw})


def test_float_weights_switch():
    conv = QuantConv2d(4, 5, 3, padding=1, bias=False, bits=1)
    x = torch.randn(2, 4, 6, 6)
    binary = conv(x)
    set_float_weights(conv, True)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, padding=1))
    set_float_weights(conv, False)
    assert torch.equal(conv(x), binary)


def test_two_stage_phases_switch_weight_quantization():
    model = HybridNet(HybridConfig(**EDGE))
    phases = _phases(model, model, two_stage(), ())
    assert [(p.name, p.epochs, p.float_weights) for p in phases] == [("joint-stage1", 1, True), ("joint", 1, False)]
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    for phase in phases:
        phase.set_modes(model)
        assert [c.float_weights for c in convs] == [phase.float_weights] * len(convs)
    sep = _phases(model, model, two_stage(mode="separate", exit_epochs=1), ())
    assert [p.name for p in sep] == ["backbone-stage1", "backbone", "exits"]
    assert two_stage().total_epochs == 2
    with pytest.raises(ConfigError, match="cloud"):
        two_stage(mode="cloud", init="x")


def test_two_stage_run_resumes_across_the_boundary(tmp_path, ds):
    net = HybridConfig(**EDGE, act_shift=True, rprelu=True, ste="approx")
    cfg = two_stage(optimizer="adam", lr=1e-3, weight_decay=0.0)
    train(tmp_path / "full", net, cfg, ds, progress=False)
    train(tmp_path / "part", net, cfg, ds, progress=False, stop_after_epochs=1)
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r.get("float_weights")) for r in log] == [("joint-stage1", True)]
    # the stage-1 checkpoint's logged validation accuracy is that of its float-weight network
    model, meta = load_model(tmp_path / "part")
    set_float_weights(model, True)
    from hybridexit.data import get_split
    from hybridexit.workflows.evaluate import evaluate_outputs
    assert evaluate_outputs(model, get_split(ds, "val", 40, 0)) == meta["val_acc"]
    train(tmp_path / "part", net, cfg, ds, progress=False, resume=True)
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r.get("float_weights")) for r in log] == [("joint-stage1", True), ("joint", None)]
    a, b = read_tensors(tmp_path / "full"), read_tensors(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    with pytest.raises(ConfigError, match="quantized"):
        train(tmp_path / "fp", HybridConfig(depth=8), two_stage(), ds, progress=False)


# ---- recipes ---------------------------------------------------------------------------------------------------

def test_reactnet_recipe_sets_every_option_and_the_sweep_refuses_it(tmp_path):
    path = ROOT / "recipes" / "c10-e20-b1-reactnet.toml"
    train_kw, network = read_recipe(path)
    cfg = HybridConfig(depth=32, edge_layers=20, edge_bits=1, exits=(20,), **network)
    assert cfg.act_shift and cfg.rprelu and cfg.ste == "approx"
    tcfg = TrainConfig(**train_kw)
    assert tcfg.stage1_epochs > 0 and tcfg.optimizer == "adam" and tcfg.weight_decay == 0
    assert tcfg.kd_alpha == 1.0 and tcfg.teacher and tcfg.init
    with pytest.raises(ConfigError, match="network options"):
        load_recipe(path)
    bad = tmp_path / "bad.toml"
    bad.write_text('rprelu = true\nact_shfit = true\n')
    with pytest.raises(ConfigError, match="act_shfit"):
        read_recipe(bad)


def test_cli_train_applies_the_recipe_network_options(tmp_path, tiny_cifar):
    from hybridexit.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text('act_shift = true\nrprelu = true\nste = "approx"\nexit_hidden = 8\nexit_pool = "k4"\n'
                      'stage1_epochs = 1\nepochs = 1\nbatch_size = 32\nval_size = 40\nlimit_train = 64\n')
    out = tmp_path / "run"
    rc = main(["train", "--data-dir", str(tiny_cifar), "--depth", "8", "--edge-layers", "4", "--edge-bits", "1",
               "--exits", "4", "--exit-pool", "k2", "--recipe", str(recipe), "--out", str(out), "--device", "cpu"])
    assert rc in (0, None)
    model, meta = load_model(out)
    assert (model.cfg.act_shift, model.cfg.rprelu, model.cfg.ste, model.cfg.exit_hidden) == (True, True, "approx", 8)
    assert model.cfg.exit_pool == "k2"  # the command line overrides the recipe
    assert meta["train"]["stage1_epochs"] == 1 and meta["epochs_done"] == 2


def test_recipe_energy_results_and_doc_are_current():
    """results/recipe-energy.json is what the energy model gives now, and docs/recipes.md shows exactly it."""
    spec = importlib.util.spec_from_file_location("recipe_energy", ROOT / "benchmarks" / "recipe_energy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = json.loads(bench.RESULTS.read_text())
    fresh = bench.rows()
    assert [r["variant"] for r in data["rows"]] == [r["variant"] for r in fresh]
    for saved, now in zip(data["rows"], fresh):
        assert saved["options"] == now["options"]
        for key in ("exit_path_uj", "cloud_uj", "added_uj", "fp32_uj", "exits_for_6x"):
            assert saved[key] == pytest.approx(now[key], rel=1e-9, abs=1e-12), (saved["variant"], key)
        assert saved["reduction"] == pytest.approx(now["reduction"], rel=1e-9)
    section = bench.DOC.read_text().split(bench.BEGIN, 1)[1].split(bench.END, 1)[0]
    assert section == "\n" + bench.render(data)
