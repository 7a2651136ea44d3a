"""Backbones (model/backbones): the registry, the CIFAR ResNets unchanged, ImageNet-style ResNets and MobileNetV2 with
torchvision's parameter counts and key names (a state dict under torchvision's names loads), the layer arithmetic
in blocks, and MAC counts equal to an independent count of each architecture, written out here."""

import pytest
import torch

from hybridexit.errors import ConfigError
from hybridexit.model.backbones import BACKBONES, get_backbone, load_torchvision, read_state_dict
from hybridexit.model.energy import energy_report
from hybridexit.model.hybrid import HybridNet
from hybridexit.model.resnet import HybridConfig, edge_feature_shape

# torchvision's parameter counts at 1000 classes (torchvision.models docs: "num_params")
TV_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "mobilenetv2": 3_504_872}
RESNET_LAYERS = {"resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False), "resnet50": ((3, 4, 6, 3), True)}
MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def resnet_macs(layers, bottleneck, size, classes):
    """torchvision ResNet conv + fc MACs, counted by hand: out_h * out_w * out_ch * in_ch / groups * k * k."""
    s = _out(size, 7, 2, 3)
    macs = s * s * 64 * 3 * 49
    s = _out(s, 3, 2, 1)
    cin = 64
    for stage, n in enumerate(layers):
        planes = 64 * 2**stage
        for j in range(n):
            stride = 2 if stage and j == 0 else 1
            o = _out(s, 3, stride, 1)
            if bottleneck:
                cout = planes * 4
                macs += s * s * planes * cin + o * o * planes * planes * 9 + o * o * cout * planes
            else:
                cout = planes
                macs += o * o * cout * cin * 9 + o * o * cout * cout * 9
            if stride != 1 or cin != cout:
                macs += o * o * cout * cin
            s, cin = o, cout
    return macs + cin * classes


def mobilenetv2_macs(size, classes):
    s = _out(size, 3, 2, 1)
    macs = s * s * 32 * 3 * 9
    cin = 32
    for t, c, n, first in MBV2:
        for j in range(n):
            stride = first if j == 0 else 1
            hid = cin * t
            o = _out(s, 3, stride, 1)
            macs += (s * s * hid * cin if t != 1 else 0) + o * o * hid * 9 + o * o * c * hid
            s, cin = o, c
    return macs + s * s * 1280 * 320 + 1280 * classes


def _float(name, size=224, classes=1000):
    return HybridConfig(backbone=name, image_size=size, num_classes=classes)


def test_registry_names_and_unknown_backbone():
    assert {"cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110", "resnet18",
            "resnet34", "resnet50", "mobilenetv2"} <= set(BACKBONES)
    with pytest.raises(ConfigError, match="unknown backbone 'vgg16'"):
        HybridConfig(backbone="vgg16")
    with pytest.raises(ConfigError, match="depth and width"):
        HybridConfig(backbone="resnet18", depth=56)


def test_cifar_resnets_stay_what_they_were():
    d = HybridConfig(edge_layers=20, edge_bits=1, exits=(20,)).to_dict()
    assert "backbone" not in d and d["depth"] == 32  # configs (and fingerprints) of CIFAR ResNets unchanged
    c = HybridConfig(backbone="cifar_resnet56", edge_layers=20)
    assert c == HybridConfig(depth=56, edge_layers=20) and c.backbone_name == "cifar_resnet56"
    assert c.notation == "20E+34C" and HybridConfig.from_dict(c.to_dict()) == c
    torch.manual_seed(0)
    a = HybridNet(HybridConfig(depth=20, edge_layers=6, edge_bits=1, exits=(6,))).eval()
    b = HybridNet(HybridConfig(backbone="cifar_resnet20", edge_layers=6, edge_bits=1, exits=(6,))).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert all(torch.equal(u, v) for u, v in zip(a(x), b(x)))


@pytest.mark.parametrize("name", sorted(TV_PARAMS))
def test_parameter_counts_are_torchvisions(name):
    assert sum(p.numel() for p in HybridNet(_float(name, 64)).parameters()) == TV_PARAMS[name]


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnet_macs_equal_an_independent_count(name):
    layers, bottleneck = RESNET_LAYERS[name]
    for size in (224, 97) if name == "resnet18" else (224,):  # 97: odd sizes round as the convs do
        assert energy_report(_float(name, size)).fp32_macs == resnet_macs(layers, bottleneck, size, 1000)
    lit = {"resnet18": 1.82e9, "resnet34": 3.67e9, "resnet50": 4.11e9}[name]  # the usual published figures
    assert abs(resnet_macs(layers, bottleneck, 224, 1000) / lit - 1) < 0.01


def test_mobilenetv2_macs_count_grouped_convs_exactly():
    for size in (224,):
        assert energy_report(_float("mobilenetv2", size)).fp32_macs == mobilenetv2_macs(size, 1000)
    assert abs(mobilenetv2_macs(224, 1000) / 300e6 - 1) < 0.01  # MobileNetV2 1.0 at 224: ~300 M MACs
    r = energy_report(HybridConfig(backbone="mobilenetv2", image_size=64, edge_layers=4, edge_bits=1, exits=(4,)))
    dw = [x for x in r.layers if x.kind == "conv" and x.block is not None and x.block < 4 and ".conv.1.0" in x.name
          or x.name.endswith("blocks.0.conv.0.0")]
    assert dw and all(x.bits == 4 for x in dw)  # depthwise convs of a binary edge run at 4 bits
    pw = [x for x in r.layers if x.name == "blocks.1.conv.0.0"]
    assert pw[0].bits == 1 and pw[0].placement == "edge"
    first_dw = next(x for x in r.layers if x.name == "blocks.1.conv.1.0")  # 96 channels, 3x3 depthwise, 16x16 out
    assert first_dw.macs == 16 * 16 * 96 * 9


def test_block_notation_split_and_exits():
    c = HybridConfig(backbone="resnet18", image_size=224, edge_layers=4, edge_bits=1, exits=(2, 4))
    assert c.edge_blocks == 4 and c.notation == "4E+4C blocks" and c.exit_block(0) == 1 and c.exit_after_block(3) == 1
    assert edge_feature_shape(c) == (128, 28, 28)
    assert edge_feature_shape(c.replace(edge_layers=0, exits=(), edge_bits=32)) == (64, 56, 56)
    with pytest.raises(ConfigError, match="resnet18 has 8 blocks"):
        c.replace(edge_layers=9)
    with pytest.raises(ConfigError, match="after block 5"):
        c.replace(exits=(5,))
    with pytest.raises(ConfigError, match="too small"):
        HybridConfig(backbone="resnet50", image_size=0)
    with pytest.raises(ConfigError, match="options of the CIFAR"):
        c.replace(rprelu=True)


@pytest.mark.parametrize("name,size,edge,exits", [("resnet18", 64, 3, (2, 3)), ("resnet50", 48, 4, (4,)),
                                                   ("mobilenetv2", 64, 5, (3,))])
def test_the_walk_split_and_exits_for_every_backbone(name, size, edge, exits):
    torch.manual_seed(0)
    cfg = HybridConfig(backbone=name, image_size=size, edge_layers=edge, edge_bits=get_backbone(name).default_edge_bits
                       if name == "mobilenetv2" else 1, exits=exits)
    net = HybridNet(cfg).eval()
    x = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    outs = net(x)
    assert len(outs) == len(exits) + 1
    e, c = net.split()
    f = e(x)
    assert tuple(f.shape[1:]) == e.feature_shape == edge_feature_shape(cfg)
    assert torch.allclose(c(f), outs[-1], atol=1e-5)
    assert [m.placement for m in net.blocks] == ["edge"] * edge + ["cloud"] * (len(net.blocks) - edge)


def _to_torchvision_resnet(sd, layers):
    """The hybrid's keys under torchvision's names, written out here (not with the backbone's own mapping)."""
    where = [(s + 1, j) for s, n in enumerate(layers) for j in range(n)]
    out = {}
    for k, v in sd.items():
        if k.startswith("stem."):
            out[k[5:]] = v
        elif k.startswith("head.fc."):
            out[k[5:]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            s, j = where[int(i)]
            out[f"layer{s}.{j}.{rest}"] = v
    return out


def _to_torchvision_mobilenet(sd):
    out = {}
    for k, v in sd.items():
        if k.startswith("stem."):
            out["features.0." + k[5:]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            out[f"features.{int(i) + 1}.{rest}"] = v
        elif k.startswith("head.conv."):
            out["features.18." + k[10:]] = v
        elif k.startswith("head.classifier."):
            out[k[5:]] = v
    return out


def _tv_resnet18_keys():
    """torchvision resnet18's state-dict keys, spelled out from its definition."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", *(f"bn1.{b}" for b in bn), "fc.weight", "fc.bias"}
    for s in range(1, 5):
        for j in range(2):
            p = f"layer{s}.{j}."
            keys |= {p + "conv1.weight", p + "conv2.weight", *(p + f"bn{i}.{b}" for i in (1, 2) for b in bn)}
            if s > 1 and j == 0:
                keys |= {p + "downsample.0.weight", *(p + f"downsample.1.{b}" for b in bn)}
    return keys


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2"])
def test_torchvision_weights_load(tmp_path, name):
    torch.manual_seed(0)
    src = HybridNet(_float(name, 64, 1000)).eval()
    for m in src.modules():  # non-trivial BatchNorm statistics, so that a key loaded in the wrong place shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    sd = src.state_dict()
    tv = _to_torchvision_mobilenet(sd) if name == "mobilenetv2" else _to_torchvision_resnet(sd, RESNET_LAYERS[name][0])
    if name == "resnet18":
        assert set(tv) == _tv_resnet18_keys() and len(tv) == 122
    torch.save(tv, tmp_path / "tv.pth")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    dst = HybridNet(_float(name, 64, 1000)).eval()
    assert load_torchvision(dst, read_state_dict(tmp_path / "tv.pth")) == []
    assert torch.equal(dst(x)[-1], src(x)[-1])
    # a hybrid (quantized edge, an exit, 10 classes) takes the same file: only what the hybrid adds stays initialized
    bits = 4 if name == "mobilenetv2" else 1
    hyb = HybridNet(HybridConfig(backbone=name, image_size=64, num_classes=10, edge_layers=2, edge_bits=bits, exits=(2,)))
    left = load_torchvision(hyb, read_state_dict(tmp_path / "tv.pth"), head=False)
    assert left and all(k.startswith("exits.") or ".q" in k or k.startswith("head.fc") or k.startswith("head.classifier")
                        for k in left)
    assert torch.equal(hyb.blocks[0].state_dict()[_a_conv(name)], sd[f"blocks.0.{_a_conv(name)}"])
    with pytest.raises(ConfigError, match="another number of classes"):
        load_torchvision(hyb, read_state_dict(tmp_path / "tv.pth"))
    with pytest.raises(ConfigError, match="not a key of torchvision"):
        load_torchvision(dst, {"features.99.weight" if name != "mobilenetv2" else "layer1.0.conv1.weight": x})


def _a_conv(name):
    return "conv.0.0.weight" if name == "mobilenetv2" else "conv1.weight"


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2"])
def test_summary_prints_the_per_layer_table(name, capsys):
    from hybridexit.cli.main import main

    assert main(["summary", "--backbone", name, "--image-size", "224", "--edge-blocks", "4", "--edge-bits", "1",
                 "--exits", "4"]) == 0
    out = capsys.readouterr().out
    want = (mobilenetv2_macs(224, 10) if name == "mobilenetv2"
            else resnet_macs(*RESNET_LAYERS[name], 224, 10))
    total = next(line for line in out.splitlines() if line.startswith("float network"))
    assert int(total.split()[4].replace(",", "")) == want
    assert f"{name} at 224x224" in out and "blocks.3." in out and "exit:0" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("blocks.")]
    assert {r[1] for r in rows if int(r[0].split(".")[1]) < 4} == {"edge"}
    assert {r[1] for r in rows if int(r[0].split(".")[1]) >= 4} == {"cloud"}


def test_summary_defaults_and_one_line_errors(capsys):
    from hybridexit.cli.main import main

    assert main(["summary", "--backbone", "mobilenetv2", "--image-size", "96", "--edge-blocks", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("blocks.0.")]
    assert rows and all(r[2] == "4" for r in rows)  # MobileNetV2's edge defaults to 4-bit
    for argv, msg in ((["--backbone", "resnet18", "--edge-blocks", "9"], "resnet18 has 8 blocks"),
                      (["--backbone", "resnet18", "--edge-blocks", "2", "--edge-layers", "4"], "not both"),
                      (["--backbone", "alexnet"], "unknown backbone")):
        assert main(["summary", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_a_float_backbone_checkpoint_initializes_its_hybrid(tmp_path):
    from hybridexit.model.checkpoint import save_model
    from hybridexit.workflows.train import TrainConfig, build_model

    torch.manual_seed(0)
    fp = HybridNet(HybridConfig(backbone="resnet18_cifar", image_size=32))
    save_model(tmp_path / "fp", fp, {"data": {"name": "cifar10", "mean": [0.0] * 3, "std": [1.0] * 3}})
    cfg = HybridConfig(backbone="resnet18_cifar", image_size=32, edge_layers=4, edge_bits=1, exits=(4,))
    hyb = build_model(cfg, TrainConfig(init=str(tmp_path / "fp")))
    assert torch.equal(hyb.blocks[3].conv2.weight, fp.blocks[3].conv2.weight)
    assert torch.equal(hyb.stem.conv1.weight, fp.stem.conv1.weight) and fp.stem.conv1.kernel_size == (3, 3)
    assert hyb.blocks[0].q1 is not None and fp.blocks[0].q1 is None  # the quantizers' BatchNorms start fresh


def test_sweep_files_take_a_backbone_axis(tmp_path):
    from hybridexit.workflows.sweep import load_sweep

    spec = tmp_path / "bb.toml"
    spec.write_text('dataset = "cifar10"\ndepth = 8\nrecipe = "recipes/sweep-tiny.toml"\npaper_threshold = 0.5\n'
                    '[calibrate]\ntarget = "max_drop"\nvalue = 0.05\n'
                    '[[grid]]\nedge_layers = [2]\nedge_bits = [1]\nexits = ["edge"]\n'
                    'backbone = ["", "resnet18_cifar", "mobilenetv2"]\n')
    s = load_sweep(spec)
    cfgs = [s.net_config(p) for p in s.points]
    assert [c.backbone_name for c in cfgs] == ["cifar_resnet8", "resnet18_cifar", "mobilenetv2"]
    assert [c.edge_blocks for c in cfgs] == [1, 2, 2]  # CIFAR counts layers (2 a block), the others blocks
    assert [p.name for p in s.points][:2] == ["e2-b1-x2-joint-k3", "resnet18_cifar-e2-b1-x2-joint-k3"]
    assert "backbone" not in s.points[0].to_dict() and s.points[1].to_dict()["backbone"] == "resnet18_cifar"
    spec.write_text(spec.read_text().replace('"mobilenetv2"', '"vgg"'))
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        load_sweep(spec)
