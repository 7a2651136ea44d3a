"""The packed engine: the binary edge half with bit-packed XNOR-popcount convolutions (kernels in ``csrc/``).

The float parts (input normalization if the network has it, the stem conv, the exit heads and the exit rule)
run as the project's own torch modules, so they compute exactly what the torch engine computes; the binary
residual blocks between them run in one native call per run of blocks. The engine is built from its export
artifact (``state``): every binary conv's sign(W) stored at one bit per weight (``*.bits``, ``numpy.packbits``,
little bit order, (O, C, 3, 3) order), its per-channel scale ``alpha = mean |W|`` and the folded BatchNorm
that precedes it (``bn_a * x + bn_b``, computed as PyTorch's CPU BatchNorm does in eval mode).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import EngineError, InputShapeError
from ..hybrid import EdgeNet, EdgeResult, HybridNet, resolve_thresholds
from ..resnet import HybridConfig, block_specs
from . import check_options
from .native import kernels

FORMAT = "hybridexit-packed-1"


def fold_bn(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with bn(x) = fma(x, a, b) in eval mode: float32, as PyTorch's CPU BatchNorm folds them
    (a = rsqrt(var + eps) * weight, b = fma(-mean, a, bias); the product is exact in float64)."""
    a = torch.rsqrt(bn.running_var.float() + bn.eps) * bn.weight.float()
    b = (bn.bias.double() - bn.running_mean.double() * a.double()).float()
    return a.contiguous(), b.contiguous()


def pack_bits(w: torch.Tensor) -> torch.Tensor:
    """sign(W) (with sign(0) = +1) at one bit per weight: uint8, little bit order, in W's element order."""
    return torch.from_numpy(np.packbits((w >= 0).flatten().numpy(), bitorder="little"))


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n, bitorder="little").astype(bool)).reshape(shape)


def kernel_weights(signs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight bit vectors in the kernels' layout from sign bits (O, C, 3, 3) (True = +1).

    Returns ``wt`` int64 (kw, opad): word w of output channel o, where column kx occupies words
    [kx colw, (kx + 1) colw) (colw = ceil(3 C / 64)) and holds tap (ky, kx), channel c at bit ky C + c
    (kw = 3 colw, opad = O rounded up to 8, zero-filled); ``wpop`` int32 (9, O): the number of +1 weights of
    each tap t = 3 ky + kx."""
    o, c = signs.shape[:2]
    colw, opad = (3 * c + 63) // 64, (o + 7) // 8 * 8
    bits = np.zeros((opad, 3, colw * 64), dtype=np.uint8)
    bits[:o, :, : 3 * c] = signs.permute(0, 3, 2, 1).reshape(o, 3, 3 * c).numpy()  # (o, kx, ky * C + c)
    words = np.packbits(bits.reshape(opad, -1), axis=1, bitorder="little").view("<u8").view(np.int64)  # (opad, kw)
    wt = torch.from_numpy(np.ascontiguousarray(words.T))
    wpop = signs.permute(0, 2, 3, 1).reshape(o, 9, c).sum(2).to(torch.int32).t().contiguous()
    return wt, wpop


def _binary_convs(edge: EdgeNet):
    for i, block in enumerate(edge.blocks):
        for j, q in ((1, block.c1), (2, block.c2)):
            yield f"blocks.{i}.c{j}", q


def export_state(edge: EdgeNet) -> dict[str, torch.Tensor]:
    """The packed artifact's tensors: float stem/exits (and normalization) as in the torch state dict, and per
    binary conv its weight bits, scale and folded BatchNorm."""
    if edge.cfg.edge_bits != 1:
        raise EngineError(f"the packed engine runs binary (1-bit) edges; this edge has {edge.cfg.edge_bits}-bit layers "
                          "(use --engine onnx or torch)")
    check_options(edge.cfg, "packed")
    state = {k: v.detach().float().clone() for k, v in edge.state_dict().items()
             if not k.startswith("blocks.") and v.is_floating_point()}
    for name, q in _binary_convs(edge):
        w = q.conv.weight.detach().float()
        state[f"{name}.bits"] = pack_bits(w)
        state[f"{name}.alpha"] = w.abs().mean(dim=(1, 2, 3))
        state[f"{name}.bn_a"], state[f"{name}.bn_b"] = fold_bn(q.bn)
    return state


class PackedEdge:
    """Edge half on the packed engine: ``decide(x, thresholds)`` as ``EdgeNet.decide``."""

    name = "packed"

    def __init__(self, cfg: HybridConfig, state: dict[str, torch.Tensor], isa: int | None = None):
        if cfg.edge_bits != 1:
            raise EngineError(f"the packed engine runs binary (1-bit) edges, not {cfg.edge_bits}-bit ones")
        check_options(cfg, "packed")
        self.cfg, self.state = cfg, state
        self.kernels = kernels()
        self.isa = self.kernels.best_isa() if isa is None else int(isa)
        shell = HybridNet(cfg).split()[0].eval()  # the float modules, loaded below; its blocks are not used
        float_keys = {k for k, v in shell.state_dict().items() if not k.startswith("blocks.") and v.is_floating_point()}
        missing = sorted(float_keys - set(state))
        if missing:
            raise EngineError(f"packed artifact lacks {len(missing)} float tensors (e.g. {missing[0]})")
        shell.load_state_dict({k: state[k] for k in float_keys}, strict=False)
        self.shell = shell
        self.blocks = [self._block_params(i, s) for i, s in enumerate(block_specs(cfg)[: cfg.edge_blocks])]
        self._runs: dict[tuple[int, int], tuple[list, list]] = {}

    def _block_params(self, i, spec):
        params = []
        for j, cin in ((1, spec.in_ch), (2, spec.out_ch)):
            p = f"blocks.{i}.c{j}"
            wt, wpop = kernel_weights(unpack_bits(self.state[f"{p}.bits"], (spec.out_ch, cin, 3, 3)))
            params += [self.state[f"{p}.bn_a"], self.state[f"{p}.bn_b"], wt, wpop, self.state[f"{p}.alpha"].contiguous()]
        return params, [spec.in_ch, spec.out_ch, spec.stride]

    @classmethod
    def from_edge(cls, edge: EdgeNet, isa: int | None = None) -> "PackedEdge":
        return cls(edge.cfg, export_state(edge), isa)

    def save(self, path) -> None:
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(path),
                  metadata={"format": FORMAT, "network": json.dumps(self.cfg.to_dict(), sort_keys=True)})

    @classmethod
    def load(cls, path, isa: int | None = None) -> "PackedEdge":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise EngineError(f"{path} is not a packed edge artifact ({FORMAT})")
        return cls(HybridConfig.from_dict(json.loads(meta["network"])), load_file(str(path)), isa)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return self.shell.feature_shape

    @property
    def isa_name(self) -> str:
        return self.kernels.isa_name(self.isa)

    def run_blocks(self, h: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Blocks [first, last) on channels-last float features (N, H, W, C)."""
        if (first, last) not in self._runs:  # the flat argument lists, built once per run of blocks
            self._runs[first, last] = ([t for p, _ in self.blocks[first:last] for t in p],
                                       [v for _, m in self.blocks[first:last] for v in m])
        params, meta = self._runs[first, last]
        return self.kernels.run_blocks(h, params, meta, self.isa)

    def prologue(self, x: torch.Tensor) -> torch.Tensor:
        """The float start of the edge, the one place where input preprocessing happens: the network's own
        normalization (raw uint8 images, or float in [0, 1]) and stem. Returns (N, H, W, C) float, contiguous."""
        want = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputShapeError(f"expected images of shape (N, {want[0]}, {want[1]}, {want[2]}), got {got}")
        h = self.shell.stem(self.shell.normalize(x))
        return h.permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of every sample after all edge blocks (no exits), as ``EdgeNet.forward``."""
        return self.run_blocks(self.prologue(x), 0, self.cfg.edge_blocks).permute(0, 3, 1, 2)

    @torch.no_grad()
    def decide(self, x: torch.Tensor, thresholds, temperatures=None) -> EdgeResult:
        """Algorithm 1 at the edge, as ``EdgeNet.decide``; features are a channels-last (N, C, H, W) view."""
        state = algorithm1(self.cfg, x.shape[0], thresholds, temperatures)
        h = self.prologue(x)
        done = 0
        for j in range(len(self.cfg.exits)):
            if state.idx.numel() == 0:
                break
            h, done = self.run_blocks(h, done, self.cfg.exit_block(j) + 1), self.cfg.exit_block(j) + 1
            h = h[state(j, self.shell.exits[self.cfg.exit_key(j)], h.permute(0, 3, 1, 2))].contiguous()
        if state.idx.numel() and done < self.cfg.edge_blocks:
            h = self.run_blocks(h, done, self.cfg.edge_blocks)
        return EdgeResult(state.preds, state.decided, state.ents, h.permute(0, 3, 1, 2), state.idx)


def algorithm1(cfg, n: int, thresholds, temperatures=None):
    """The torch engine's own Algorithm-1 state (``hybrid._Algorithm1``: the exit rule and the bookkeeping of who
    stopped where), shared by every engine so that all apply the exit rule the same way."""
    from ..hybrid import _Algorithm1

    thr = resolve_thresholds(cfg, thresholds)
    temps = (1.0,) * len(thr) if temperatures is None else resolve_thresholds(cfg, temperatures, "temperatures")
    return _Algorithm1(thr, temps, n, len(thr), torch.device("cpu"))
