import pytest
import torch

from hybridexit import CLOUD, ConfigError, HybridConfig, HybridNet, InputShapeError, conditional_inference
from hybridexit.model.exits import entropy


def small(**kw):
    base = dict(depth=20, num_classes=10, edge_layers=8, edge_bits=1, exits=(4, 8))
    base.update(kw)
    return HybridConfig(**base)


def trained_like(cfg, seed=0):
    torch.manual_seed(seed)
    m = HybridNet(cfg)
    # give BatchNorm non-trivial statistics so eval mode is not the identity
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32))
    return m.eval()


@pytest.mark.parametrize("bits", [1, 2, 4, 32])
def test_split_composition_equals_whole_network(bits):
    m = trained_like(small(edge_bits=bits))
    edge, cloud = m.split()
    x = torch.randn(7, 3, 32, 32)
    assert torch.equal(cloud(edge(x)), m(x)[-1])


def test_split_halves_have_their_own_state():
    m = trained_like(small())
    edge, cloud = m.split()
    assert any(k.startswith("exits.") for k in edge.state_dict())
    assert not any(k.startswith("exits.") or k.startswith("stem") for k in cloud.state_dict())
    n = sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for p in edge.parameters()) + sum(p.numel() for p in cloud.parameters()) == n
    with torch.no_grad():
        next(edge.parameters()).add_(1.0)
    assert not torch.equal(next(edge.parameters()), m.stem.weight)  # deep copies, not views


def test_edge_blocks_quantized_cloud_blocks_float():
    m = HybridNet(HybridConfig(depth=32, edge_layers=20, edge_bits=1, exits=(20,)))
    assert [b.bits for b in m.blocks] == [1] * 10 + [32] * 5
    assert m.exits["20"].fc.in_features == 32 * 5 * 5  # kernel-3 pooling, as in the authors' code
    m16 = HybridNet(HybridConfig(depth=32, edge_layers=24, edge_bits=4, exits=(24,), num_classes=100))
    assert m16.exits["24"].fc.weight.shape == (100, 256)  # the paper's 256 x 100 exit


class CallCounter:
    def __init__(self, module):
        self.calls, self.samples = 0, []
        module.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.calls += 1
        self.samples.append(inputs[0].clone())


def test_threshold_zero_nothing_exits_and_predictions_equal_final():
    m = trained_like(small())
    edge, cloud = m.split()
    x = torch.randn(20, 3, 32, 32)
    d = conditional_inference(edge, cloud, x, [0.0, 0.0])
    assert (d.decided_at == CLOUD).all()
    assert torch.equal(d.predictions, m(x)[-1].argmax(1))
    assert not torch.isnan(d.entropies).any()


def test_huge_threshold_everything_exits_cloud_never_called():
    m = trained_like(small())
    edge, cloud = m.split()
    counter = CallCounter(cloud)
    later_block = CallCounter(edge.blocks[2])  # after the first exit at layer 4
    x = torch.randn(20, 3, 32, 32)
    d = conditional_inference(edge, cloud, x, [1e9, 1e9])
    assert counter.calls == 0 and later_block.calls == 0
    assert (d.decided_at == 0).all()
    assert torch.equal(d.predictions, m(x)[0].argmax(1))
    assert torch.isnan(d.entropies[:, 1]).all()


def test_mixed_batch_cloud_receives_exactly_the_non_exited_samples():
    m = trained_like(small(exits=(8,)))
    edge, cloud = m.split()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        ent = entropy(m(x)[0])
    thr = float(ent.median())
    counter = CallCounter(cloud)
    d = conditional_inference(edge, cloud, x, [thr])
    stays = ent >= thr
    assert 0 < int(stays.sum()) < 32
    assert counter.calls == 1
    assert torch.equal(counter.samples[0], edge(x[stays]))
    assert torch.equal(d.decided_at == CLOUD, stays)
    assert torch.equal(d.predictions[stays], m(x)[-1].argmax(1)[stays])
    assert torch.equal(d.predictions[~stays], m(x)[0].argmax(1)[~stays])


def test_bad_configs_raise_typed_errors():
    for kw, msg in [(dict(edge_layers=9), "even"), (dict(edge_layers=40), "from 0 to 30"),
                    (dict(edge_layers=10, exits=(12,)), "not allowed"), (dict(edge_bits=3), "unsupported"),
                    (dict(depth=33), "6n\\+2"), (dict(exit_pool="max"), "exit_pool")]:
        with pytest.raises(ConfigError, match=msg):
            HybridConfig(**kw)


def test_wrong_input_shape_is_a_clear_error():
    m = HybridNet(small())
    with pytest.raises(InputShapeError, match=r"\(N, 3, 32, 32\)"):
        m(torch.randn(2, 1, 32, 32))
    edge, cloud = m.split()
    with pytest.raises(InputShapeError, match="cloud half expects"):
        cloud(torch.randn(2, 16, 32, 32))
    with pytest.raises(InputShapeError):
        edge.decide(torch.randn(3, 32, 32), [0.5, 0.5])


def test_config_roundtrip_and_migration_of_old_configs():
    cfg = small(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    assert HybridConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        HybridConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("mean", "std")}
    old["thresholds"] = [0.3, 0.5]  # written before the exit policy moved out of the network config
    assert HybridConfig.from_dict(old, {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}) == cfg


def test_raw_uint8_images_are_the_interface():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    m = trained_like(small(mean=mean, std=std))
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    want = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(m.normalize(x), want, atol=1e-6)
    assert torch.equal(m(x)[-1], m(x.float() / 255)[-1])  # float images in [0, 1] are the same input
    edge, cloud = m.split()
    assert torch.equal(cloud(edge(x)), m(x)[-1])


def test_one_walk_serves_training_prefix_and_exits():
    m = trained_like(small())
    x = torch.randn(6, 3, 32, 32)
    outs = m(x)
    h, logits = m.forward_intermediates(x)
    assert len(logits) == 2 and all(torch.equal(a, b) for a, b in zip(logits, outs[:2]))
    h4, feats = m.forward_intermediates(x, stop_block=m.cfg.exit_block(1) + 1, exit_logits=False)
    assert len(feats) == 2 and torch.equal(feats[1], h4)
    assert torch.equal(m.exits[m.cfg.exit_key(1)](feats[1]), outs[1])
    assert [m.cfg.exit_after_block(b) for b in range(4)] == [None, 0, None, 1]  # exits at layers 4 and 8
