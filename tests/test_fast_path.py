"""The fast training path (issue 40) on the CPU device: the device-resident feed draws what the host path draws,
its crops and flips have the host path's distribution, bf16 autocast leaves quantized layers exact, and a run
trains through it (and stops at a deadline)."""

import math
import time

import pytest
import torch
from torch import nn

from hybridexit import HybridConfig
from hybridexit.data import Split, augment, batches
from hybridexit.data.device_feed import DeviceFeed, crop_flip, draw_crop_flip
from hybridexit.model.checkpoint import load_model, read_tensors
from hybridexit.model.hybrid import HybridNet
from hybridexit.model.quant import QuantConv2d, quantize_weight
from hybridexit.workflows.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NET = HybridConfig(depth=8, edge_layers=4, edge_bits=1, exits=(2, 4))


def tcfg(**kw):
    base = dict(epochs=2, batch_size=32, val_size=40, lr=0.05, warmup_epochs=0.5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("drop_last", [False, True])
def test_device_feed_draws_the_host_batches_bit_for_bit(drop_last):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(70)
    feed = DeviceFeed(images, labels, "cpu")
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):  # two epochs: the generator's state carries over identically
        ours = list(feed.epoch(32, gen_a, drop_last=drop_last))
        split = Split(images, labels)
        host = []
        for x, y in batches(split, 32, shuffle=True, generator=gen_b):
            if drop_last and len(y) < 32:
                break
            host.append((augment(x, gen_b), y))
        assert len(ours) == len(host) == (2 if drop_last else 3)
        for (xa, ya), (xb, yb) in zip(ours, host):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())


def _coordinate_images(n: int) -> torch.Tensor:
    """Images whose pixels name their own row (channel 0) and column (channel 1), 1-based: a crop's offsets and
    flip can be read back from its output (zero padding reads 0)."""
    rows = torch.arange(1, 33, dtype=torch.uint8).view(32, 1).expand(32, 32)
    cols = torch.arange(1, 33, dtype=torch.uint8).view(1, 32).expand(32, 32)
    one = torch.stack([rows, cols, torch.full((32, 32), 200, dtype=torch.uint8)])
    return one.expand(n, 3, 32, 32).contiguous()


def _read_back(out: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """(n,) cell index oy * 9 * 2 + ox * 2 + flip of each augmented coordinate image (the centre pixel is never
    padding: offsets are within +-pad)."""
    r, c = out[:, 0, 16, 16].long(), out[:, 1, 16, 16].long()  # 1-based source row and column at (16, 16)
    oy = r - 1 - 16 + pad
    flipped = out[:, 1, 16, 17].long() < c  # columns run backwards
    ox = torch.where(flipped, (c - 1) - (31 - 16) + pad, c - 1 - 16 + pad)
    assert ((oy >= 0) & (oy <= 2 * pad) & (ox >= 0) & (ox <= 2 * pad)).all()
    return oy * (2 * pad + 1) * 2 + ox * 2 + flipped.long()


def _chi2_two_sample(a: torch.Tensor, b: torch.Tensor, cells: int) -> tuple[float, float]:
    """(statistic, critical value at p = 0.001) of the chi-square test that two samples of cell indices come from
    one distribution (Wilson-Hilferty approximation of the quantile)."""
    na, nb = torch.bincount(a, minlength=cells).double(), torch.bincount(b, minlength=cells).double()
    keep = (na + nb) > 0
    na, nb = na[keep], nb[keep]
    ka, kb = math.sqrt(nb.sum() / na.sum()), math.sqrt(na.sum() / nb.sum())
    stat = float((((ka * na - kb * nb) ** 2) / (na + nb)).sum())
    df = int(keep.sum()) - 1
    z = 3.0902  # the standard normal's 0.999 quantile
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_device_crops_and_flips_have_the_host_distribution():
    n = 16_000
    images = _coordinate_images(n)
    feed = DeviceFeed(images, torch.zeros(n, dtype=torch.long), "cpu")
    ours = torch.cat([_read_back(x) for x, _ in feed.epoch(1000, torch.Generator().manual_seed(11))])
    g = torch.Generator().manual_seed(12)  # another seed: the same law, other draws
    host = torch.cat([_read_back(augment(images[i:i + 1000], g)) for i in range(0, n, 1000)])
    stat, crit = _chi2_two_sample(ours, host, 162)
    assert stat < crit, f"chi2 {stat:.1f} >= {crit:.1f}: the device crops/flips differ from the host path's"
    assert set(ours.tolist()) == set(range(162))  # every offset pair and both flips occur
    # the same test rejects a feed whose offsets miss the last position (the classic off-by-one): it can fail
    params = draw_crop_flip([n], torch.Generator().manual_seed(13), 4)
    params[:2] = params[:2].clamp(max=7)
    biased = _read_back(crop_flip(images, params, 4))
    stat_bad, _ = _chi2_two_sample(biased, host, 162)
    assert stat_bad > crit


@pytest.mark.parametrize("bits", [1, 2])
def test_bf16_autocast_leaves_quantized_convs_exact(bits):
    torch.manual_seed(0)
    net = HybridNet(HybridConfig(depth=8, edge_layers=6, edge_bits=bits, exits=(4,))).train()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0].detach(), o.detach())))
             for m in net.modules() if isinstance(m, QuantConv2d)]
    floats = []
    hooks.append(net.stem.register_forward_hook(lambda m, i, o: floats.append(o.dtype)))
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with torch.autocast("cpu", torch.bfloat16):
        net(x)
    for h in hooks:
        h.remove()
    assert floats == [torch.bfloat16]  # the float stem did run in bf16: the autocast was on
    assert len(seen) == 6
    with torch.no_grad():
        for m, inp, out in seen:
            assert out.dtype == torch.float32
            ref = m(inp.float())  # the same layer, same input, outside autocast: FP32 throughout
            assert torch.equal(out, ref)
    # without the FP32 guard the layer's product in bf16 is not exact (alpha * sign(W) rounds to bf16): the check bites
    m, inp, _ = seen[-1]
    qw = quantize_weight(m.weight, m.bits).detach()
    with torch.no_grad():
        exact = nn.functional.conv2d(inp, qw, None, m.stride, m.padding)
        with torch.autocast("cpu", torch.bfloat16):
            plain = nn.functional.conv2d(inp, qw, None, m.stride, m.padding)
    assert plain.dtype == torch.bfloat16 and not torch.equal(plain.float(), exact)


def test_device_data_run_is_bit_identical_to_the_host_run_on_the_cpu(tmp_path, ds):
    train(tmp_path / "host", NET, tcfg(), ds, progress=False, device="cpu")
    # the fast path, interrupted and resumed: the same weights bit for bit
    train(tmp_path / "dev", NET, tcfg(device_data=True), ds, progress=False, device="cpu", stop_after_epochs=1)
    train(tmp_path / "dev", NET, tcfg(device_data=True), ds, progress=False, device="cpu", resume=True)
    a, b = read_tensors(tmp_path / "host"), read_tensors(tmp_path / "dev")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bf16_run_trains_through_the_fast_path_on_the_cpu(tmp_path, ds):
    net = NET.replace(act_shift=True, rprelu=True)
    meta = train(tmp_path / "bf", net, tcfg(device_data=True, bf16=True, optimizer="adam", lr=2e-3,
                                            stage1_epochs=1, epochs=1), ds, progress=False, device="cpu")
    assert meta["epochs_done"] == 2 and meta["train"]["bf16"] and meta["train"]["device_data"]
    model, _ = load_model(tmp_path / "bf")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    fp32 = train(tmp_path / "fp", net, tcfg(device_data=True, optimizer="adam", lr=2e-3, stage1_epochs=1, epochs=1),
                 ds, progress=False, device="cpu")
    a, b = read_tensors(tmp_path / "bf"), read_tensors(tmp_path / "fp")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 did change the float arithmetic
    assert fp32["epochs_done"] == 2


def test_a_deadline_stops_at_an_epoch_boundary_and_the_run_resumes(tmp_path, ds):
    cfg = tcfg(epochs=3, device_data=True)
    meta = train(tmp_path / "d", NET, cfg, ds, progress=False, device="cpu", deadline=time.time() + 0.01)
    assert meta["epochs_done"] == 1  # a fresh run's first epoch runs; the next would end after the deadline
    meta = train(tmp_path / "d", NET, cfg, ds, progress=False, device="cpu", resume=True, deadline=time.time() + 600)
    assert meta["epochs_done"] == 3
    train(tmp_path / "ref", NET, cfg, ds, progress=False, device="cpu")
    a, b = read_tensors(tmp_path / "d"), read_tensors(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)
