"""Operation counts measured from the real modules, and the energy model of the paper (Table I).

Counting: one forward pass of a single image through the ``HybridNet`` (any backbone) with forward hooks on every
conv, linear, pooling layer and residual block (a block whose ``residual_add`` is true); each layer's MACs come
from the tensor shapes it actually saw, its bit width from the module (``bits``), its placement from where it sits
(edge, cloud, or exit k).

What is counted: conv and linear MACs at the layer's bit width (a grouped conv: in_channels / groups x kernel MACs
per output, so a depthwise conv counts kernel MACs per output); max-pooling comparisons (k*k - 1 per output),
residual additions, average-pooling additions
and linear biases as 32-bit adds; the binary-edge recipe options' per-element float arithmetic (``quant.py``), as
the modules compute it: RSign's threshold (``ChannelShift``) one 32-bit add per element, RPReLU one 32-bit add
(x - gamma) and one 32-bit MAC (beta * (.) + zeta) per element, with no memory traffic of their own (they run
fused with the conv they belong to). BatchNorm is not counted: at inference it folds into the neighbouring float
conv / linear, and before a sign() it becomes a per-channel threshold. Energy per op (default, Table I):
32-bit MAC 4.6 pJ, 32-bit add 0.9 pJ, binary MAC 0.2 pJ, a k-bit MAC k x 0.2 pJ ("proportional to bit-depth").
Memory access (2.5 pJ per bit: weights at their bit width, activations read at the layer's input precision and
written in 32-bit) is reported on its own line; the headline ratio is computational energy, as in the paper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .quant import ChannelShift, RPReLU
from .resnet import OPTION_DEFAULTS, HybridConfig


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation in picojoules. Defaults: Table I of the paper (45 nm, Horowitz 2014)."""

    mac32_pj: float = 4.6
    add32_pj: float = 0.9
    mac1_pj: float = 0.2
    mem_pj_per_bit: float = 2.5
    kbit_mac_scale: str = "linear"  # "linear": k-bit MAC = k x binary MAC

    def __post_init__(self):
        if min(self.mac32_pj, self.add32_pj, self.mac1_pj, self.mem_pj_per_bit) < 0:
            raise ConfigError("energy constants must be non-negative")
        if self.kbit_mac_scale not in ("linear",):
            raise ConfigError(f"kbit_mac_scale={self.kbit_mac_scale!r}: only 'linear' (k x binary MAC) is defined")

    def mac_pj(self, bits: int) -> float:
        return self.mac32_pj if bits >= 32 else bits * self.mac1_pj


@dataclass
class LayerCount:
    name: str
    kind: str  # conv, linear, add, pool, shift (RSign), rprelu
    placement: str  # edge, cloud, exit:K
    bits: int
    params: int
    macs: int
    adds: int
    weight_bits: int
    act_read_bits: int
    act_write_bits: int
    block: int | None = None  # index of the residual block the layer belongs to (None: stem, exits, head)

    def compute_pj(self, t: EnergyTable) -> float:
        return self.macs * t.mac_pj(self.bits) + self.adds * t.add32_pj

    def memory_pj(self, t: EnergyTable) -> float:
        return (self.weight_bits + self.act_read_bits + self.act_write_bits) * t.mem_pj_per_bit


def _structure(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """Module name -> (placement, block index), from the modules themselves: a module's ``placement`` attribute
    (set by ``HybridNet`` from where it sits: edge, cloud, exit:k) or its nearest ancestor's, and the index of
    the block in ``model.blocks`` that holds it. Names are only keys here: renaming a module changes nothing."""
    block_of = {id(b): i for i, b in enumerate(model.blocks)}
    out: dict[str, tuple[str, int | None]] = {}
    for name, m in model.named_modules():
        parent = out.get(name.rsplit(".", 1)[0] if "." in name else "", ("cloud", None))
        out[name] = (getattr(m, "placement", parent[0]), block_of.get(id(m), parent[1]))
    return out


def count_layers(model: nn.Module) -> list[LayerCount]:
    """Per-layer operation counts of a ``HybridNet`` for one image, measured by hooks on a real forward pass."""
    cfg: HybridConfig = model.cfg
    rows: list[LayerCount] = []
    hooks = []
    where = _structure(model)

    def hook(name, mod):
        def fn(m, inp, out):
            x = inp[0]
            place, block = where[name]
            bits = int(getattr(m, "bits", 32))
            if isinstance(m, nn.Conv2d):
                k = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                macs = out.numel() * k
                adds = out.numel() if m.bias is not None else 0
                rows.append(LayerCount(name, "conv", place, bits, m.weight.numel(), macs, adds,
                                       m.weight.numel() * bits, x.numel() * bits, out.numel() * 32, block))
            elif isinstance(m, nn.Linear):
                rows.append(LayerCount(name, "linear", place, 32, sum(p.numel() for p in m.parameters()),
                                       out.numel() * m.in_features, out.numel() if m.bias is not None else 0,
                                       m.weight.numel() * 32, x.numel() * 32, out.numel() * 32, block))
            elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                rows.append(LayerCount(name, "pool", place, 32, 0, 0, x.numel(), 0, x.numel() * 32, out.numel() * 32,
                                       block))
            elif isinstance(m, nn.MaxPool2d):  # comparisons, counted as 32-bit adds: k*k - 1 per output
                ks = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
                cmp = out.numel() * (ks[0] * ks[1] - 1)
                rows.append(LayerCount(name, "pool", place, 32, 0, 0, cmp, 0, x.numel() * 32, out.numel() * 32, block))
            elif getattr(m, "residual_add", False):  # a block with a residual add (its ``residual_add`` says so)
                rows.append(LayerCount(name + ".add", "add", place, 32, 0, 0, out.numel(), 0,
                                       2 * out.numel() * 32, out.numel() * 32, block))
            elif isinstance(m, (ChannelShift, RPReLU)):  # per-element float ops, fused with their conv (no I/O)
                params = sum(p.numel() for p in m.parameters())
                macs = out.numel() if isinstance(m, RPReLU) else 0
                rows.append(LayerCount(name, "rprelu" if macs else "shift", place, 32, params, macs, out.numel(),
                                       params * 32, 0, 0, block))
        return fn

    for name, m in model.named_modules():
        if (isinstance(m, (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, ChannelShift, RPReLU))
                or getattr(m, "residual_add", False)):
            hooks.append(m.register_forward_hook(hook(name, m)))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


@dataclass
class EnergyReport:
    """Per-image energy of a hybrid network (microjoules). Exit k costs ``exit_path_uj[k]`` for the samples
    that stop there; the others pay ``edge_uj`` (all edge blocks and all exits) plus ``cloud_uj``."""

    config: HybridConfig
    table: EnergyTable
    layers: list[LayerCount]
    fp32_uj: float
    fp32_macs: int
    fp32_memory_uj: float
    edge_uj: float
    cloud_uj: float
    edge_macs_by_bits: dict[int, int]
    cloud_macs: int
    exit_path_uj: list[float]
    edge_memory_uj: float
    cloud_memory_uj: float
    exit_path_memory_uj: list[float] = field(default_factory=list)

    def check_rates(self, exit_rates) -> list[float]:
        rates = [float(r) for r in exit_rates]
        if len(rates) != len(self.config.exits):
            raise ConfigError(f"{len(rates)} exit rates for {len(self.config.exits)} exits: give one fraction per exit")
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0 + 1e-9:
            raise ConfigError(f"exit rates {rates} must each be in [0, 1] and sum to at most 1")
        return rates

    def expected_uj(self, exit_rates=()) -> float:
        rates = self.check_rates(exit_rates)
        stay = 1.0 - sum(rates)
        return sum(r * e for r, e in zip(rates, self.exit_path_uj)) + stay * (self.edge_uj + self.cloud_uj)

    def expected_memory_uj(self, exit_rates=()) -> float:
        rates = self.check_rates(exit_rates)
        stay = 1.0 - sum(rates)
        return (sum(r * e for r, e in zip(rates, self.exit_path_memory_uj))
                + stay * (self.edge_memory_uj + self.cloud_memory_uj))

    def to_dict(self, exit_rates=()) -> dict:
        rates = self.check_rates(exit_rates)
        exp = self.expected_uj(rates)
        return {
            "config": self.config.to_dict(),
            "energy_table_pj": dataclasses.asdict(self.table),
            "exit_rate": rates,
            "fp32_uj": self.fp32_uj,
            "fp32_macs": self.fp32_macs,
            "edge_uj": self.edge_uj,
            "cloud_uj": self.cloud_uj,
            "exit_path_uj": self.exit_path_uj,
            "expected_uj": exp,
            "reduction": self.fp32_uj / exp if exp > 0 else float("inf"),
            "edge_macs_by_bits": {str(b): m for b, m in sorted(self.edge_macs_by_bits.items())},
            "cloud_macs": self.cloud_macs,
            "memory_uj": {"fp32": self.fp32_memory_uj, "edge": self.edge_memory_uj, "cloud": self.cloud_memory_uj,
                          "expected": self.expected_memory_uj(rates)},
        }


def _sum_uj(rows, table, pred, memory=False) -> float:
    f = (lambda r: r.memory_pj(table)) if memory else (lambda r: r.compute_pj(table))
    return sum(f(r) for r in rows if pred(r)) / 1e6


def _edge_path(rows, cfg: HybridConfig, k: int):
    """Rows paid by a sample that stops at exit k: the edge up to the exit's block (stem included), exits 0..k."""
    last_block = cfg.exit_block(k)

    def pred(r):
        if r.placement.startswith("exit:"):
            return int(r.placement[5:]) <= k
        return r.placement == "edge" and (r.block is None or r.block <= last_block)
    return pred


def _shapes_only(cfg: HybridConfig) -> nn.Module:
    """The network of ``cfg`` without the project's weight initialization: the counts read only shapes, bits and
    placement."""
    from .hybrid import HybridNet

    return HybridNet(cfg, init=False)


def energy_report(model_or_cfg, table: EnergyTable | None = None) -> EnergyReport:
    """Energy per image of a hybrid network (a ``HybridNet`` or just its config), against its float twin."""
    table = table or EnergyTable()
    model = model_or_cfg if isinstance(model_or_cfg, nn.Module) else _shapes_only(model_or_cfg)
    cfg = model.cfg
    rows = count_layers(model)
    fp_cfg = cfg.replace(edge_layers=0, edge_bits=32, exits=(), **OPTION_DEFAULTS)
    fp_rows = rows if fp_cfg == cfg else count_layers(_shapes_only(fp_cfg))
    on_edge = lambda r: r.placement != "cloud"  # noqa: E731
    on_cloud = lambda r: r.placement == "cloud"  # noqa: E731
    macs_by_bits: dict[int, int] = {}
    for r in rows:
        if on_edge(r) and r.macs:
            macs_by_bits[r.bits] = macs_by_bits.get(r.bits, 0) + r.macs
    return EnergyReport(
        config=cfg, table=table, layers=rows,
        fp32_uj=_sum_uj(fp_rows, table, lambda r: True),
        fp32_macs=sum(r.macs for r in fp_rows),
        fp32_memory_uj=_sum_uj(fp_rows, table, lambda r: True, memory=True),
        edge_uj=_sum_uj(rows, table, on_edge),
        cloud_uj=_sum_uj(rows, table, on_cloud),
        edge_macs_by_bits=macs_by_bits,
        cloud_macs=sum(r.macs for r in rows if on_cloud(r)),
        exit_path_uj=[_sum_uj(rows, table, _edge_path(rows, cfg, k)) for k in range(len(cfg.exits))],
        edge_memory_uj=_sum_uj(rows, table, on_edge, memory=True),
        cloud_memory_uj=_sum_uj(rows, table, on_cloud, memory=True),
        exit_path_memory_uj=[_sum_uj(rows, table, _edge_path(rows, cfg, k), memory=True)
                             for k in range(len(cfg.exits))],
    )


def summary_table(report: EnergyReport) -> str:
    """A per-layer table (like larq's model summary): layer, placement, bits, params, MACs, energy."""
    t = report.table
    w = max([26] + [len(r.name) + 2 for r in report.layers])
    head = f"{'layer':<{w}}{'place':<8}{'bits':>5}{'params':>13}{'MACs':>16}{'adds':>13}{'energy uJ':>12}"
    lines = [head, "-" * len(head)]
    totals: dict[str, list[float]] = {}
    for r in report.layers:
        e = r.compute_pj(t) / 1e6
        lines.append(f"{r.name:<{w}}{r.placement:<8}{r.bits:>5}{r.params:>13,}{r.macs:>16,}{r.adds:>13,}{e:>12.3f}")
        tot = totals.setdefault(r.placement, [0, 0, 0.0])
        tot[0] += r.params
        tot[1] += r.macs
        tot[2] += e
    lines.append("-" * len(head))
    for place, (p, m, e) in totals.items():
        lines.append(f"{'total ' + place:<{w}}{'':<8}{'':>5}{int(p):>13,}{int(m):>16,}{'':>13}{e:>12.3f}")
    lines.append(f"{'float network (all FP32)':<{w}}{'':<8}{'':>5}{'':>13}{report.fp32_macs:>16,}{'':>13}"
                 f"{report.fp32_uj:>12.3f}")
    return "\n".join(lines)
