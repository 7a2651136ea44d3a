"""The learned bottleneck: quantizer, PCA start, training with the edge frozen, export as a checkpoint with a codec."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hybridexit import codecs
from hybridexit.bottleneck import Bottleneck, BottleneckConfig, export_checkpoint, train_bottleneck


def test_symbols_are_what_the_forward_pass_quantizes():
    torch.manual_seed(0)
    b = Bottleneck(8, 3, 2).eval()
    f = torch.randn(4, 8, 5, 5) * 3
    sym = b.symbols(f)
    assert sym.dtype == torch.uint8 and int(sym.max()) < 4
    assert len(torch.unique(sym)) == 4  # every level is used on spread-out data
    torch.testing.assert_close(b.from_symbols(sym), b(f))


def test_rounding_passes_gradients_to_the_reduction_and_the_step():
    torch.manual_seed(0)
    b = Bottleneck(8, 3, 2).train()
    b(torch.randn(6, 8, 4, 4)).pow(2).sum().backward()
    assert b.reduce.weight.grad.abs().sum() > 0 and b.log_step.grad.abs().sum() > 0


def test_pca_start_reconstructs_low_rank_features():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 8, generator=g)
    z = torch.randn(200, 3, 4, 4, generator=g)
    f = torch.einsum("nkhw,kc->nchw", z, basis) + 0.5
    b = Bottleneck(8, 3, 4)
    b.init_pca(f)
    b.eval()
    rel = (b(f) - f).pow(2).mean() / (f - f.mean()).pow(2).mean()
    assert rel < 0.05  # 4-bit codes of the 3 principal directions: only the quantization error is left


def test_bad_configs_are_refused():
    with pytest.raises(codecs.ConfigError):
        Bottleneck(8, 9, 2)
    with pytest.raises(codecs.ConfigError):
        Bottleneck(8, 2, 5)
    with pytest.raises(codecs.ConfigError):
        BottleneckConfig(epochs=0)


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_cifar):
    from hybridexit.checkpoint import save_model
    from hybridexit.hybrid import HybridNet
    from hybridexit.policy import ExitPolicy, write_policy
    from hybridexit.resnet import HybridConfig

    torch.manual_seed(0)
    cfg = HybridConfig(depth=8, num_classes=10, edge_layers=4, edge_bits=1, exits=(4,))
    model = HybridNet(cfg).eval()
    path = tmp_path / "tiny"
    save_model(path, model, {"data": {"name": "cifar10", "mean": list(cfg.mean), "std": list(cfg.std),
                                      "classes": [f"class{i}" for i in range(10)], "val_size": 40, "split_seed": 0}})
    write_policy(path, ExitPolicy((1.5,)))
    return path


def test_training_keeps_the_edge_and_exports_a_working_codec(tiny_ckpt, tiny_cifar, tmp_path):
    from hybridexit.checkpoint import load_model
    from hybridexit.data import get_split, load_cifar

    run = tmp_path / "run"
    bcfg = BottleneckConfig(code_channels=4, bits=2, epochs=2, batch_size=32, match_blocks=1)
    hist = train_bottleneck(str(tiny_ckpt), run, bcfg, data_dir=tiny_cifar)["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and (run / "best.pt").is_file()
    assert train_bottleneck(str(tiny_ckpt), run, bcfg, data_dir=tiny_cifar)["history"] == hist  # resumed: done
    out = tmp_path / "with-codec"
    export_checkpoint(run, out)
    old, new = load_file(str(tiny_ckpt / "model.safetensors")), load_file(str(out / "model.safetensors"))
    edge = [k for k in old if not (k.startswith("head.") or (k.startswith("blocks.") and int(k.split(".")[1]) >= 2))]
    assert edge and all(torch.equal(old[k], new[k]) for k in edge)  # edge and exits bit-identical
    assert any(not torch.equal(old[k], new[k]) for k in old if k not in edge)  # the cloud half was trained
    assert codecs.required_codec(out) == "bn"
    model, meta = load_model(out)
    ds = load_cifar("cifar10", tiny_cifar)
    r = codecs.evaluate_codec(model, get_split(ds, "val", 40, 0), meta["policy"].thresholds, codecs.get("bn", out), out)
    assert r["n"] == 40 and 0 < r["payload_bytes_per_offloaded"] < 4 * 16 * 16 * 2 / 8 + 64
    assert np.isfinite(r["accuracy"])
    with pytest.raises(codecs.ConfigError):
        train_bottleneck(str(tiny_ckpt), run, BottleneckConfig(code_channels=5, epochs=2), data_dir=tiny_cifar)
