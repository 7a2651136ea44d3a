"""The packed engine: the edge half's whole decision in one native call (kernels in ``csrc/``).

``decide`` runs, per batch, in C++: the network's normalization (raw uint8 or float images), the float stem conv,
the quantized residual blocks, each exit head (folded BatchNorm, ReLU, average pool, optional hidden layer, linear),
the softmax entropy and the exit rule; the samples that exit leave the batch, the others go on, and the features
of those left are returned for the cloud. Binary blocks are bit-packed XNOR-popcount convolutions with fused
epilogues: the per-channel scale, RPReLU (ReActNet: prelu_b(y - g) + z), the float residual add, and the next
conv's folded BatchNorm, RSign threshold and sign-and-pack (sign(bn(y) - t) is packed as bn(y) >= t, the same
bit in IEEE arithmetic). k-bit blocks run as integer dot products (``engines.kbit``).

The artifact (``state``) holds every binary conv's sign(W) at one bit per weight (``*.bits``, ``numpy.packbits``,
little bit order, (O, C, 3, 3) order), its per-channel scale ``alpha = mean |W|``, the folded BatchNorm that
precedes it (``bn_a * x + bn_b``, computed as PyTorch's CPU BatchNorm does in eval mode) and its options
(``.shift``, ``.rp_g/.rp_b/.rp_z``); the float stem, exits and normalization as in the torch state dict.
Integer parts are exact and the stem is summed in float64 and rounded once, as the torch engine computes them in
eval mode (``quant.quantized_conv_exact``, ``quant.RoundedOnceConv2d``), so the features are the torch engine's bit
for bit; the exit heads and entropy sum in another order (float rounding), so a decision can differ only where an
entropy lies within rounding of its threshold.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import EngineError, InputShapeError
from ..model.hybrid import EdgeNet, EdgeResult, HybridNet, resolve_thresholds
from ..model.resnet import HybridConfig, block_specs
from . import PACKED_BITS, check_backbone  # binary: XNOR-popcount kernels; k-bit: integer dot products (engines.kbit)
from .folding import fold_bn  # noqa: F401  (re-exported: the engines' shared BatchNorm fold)
from .native import kernels

PACKED_FORMAT = "hybridexit-packed-1"
KBIT_ISA_NAMES = ("portable", "avx2", "avx512bw", "avx512vnni")  # the k-bit kernels' levels (csrc/kbit.h)


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


def _quant_convs(edge: EdgeNet):
    for i, block in enumerate(edge.blocks):
        for j, q in ((1, block.c1), (2, block.c2)):
            yield f"blocks.{i}.c{j}", q


def _option_state(name: str, q) -> dict[str, torch.Tensor]:
    """A quantized conv's recipe options as artifact tensors: RSign's threshold (``.shift``, the ChannelShift bias:
    sign(bn(x) - shift)) and RPReLU's ``.rp_g`` / ``.rp_b`` / ``.rp_z`` (prelu_b(y - g) + z), when the network has
    them."""
    out = {}
    if q.shift is not None:
        out[f"{name}.shift"] = q.shift.bias.detach().float().clone()
    if q.rprelu is not None:
        r = q.rprelu
        out[f"{name}.rp_g"], out[f"{name}.rp_b"], out[f"{name}.rp_z"] = (
            t.detach().float().clone() for t in (r.shift_in, r.slope, r.shift_out))
    return out


def export_state(edge: EdgeNet) -> dict[str, torch.Tensor]:
    """The packed artifact's tensors: float stem/exits (and normalization) as in the torch state dict; per binary
    conv its weight bits, scale, folded BatchNorm and recipe options (``_option_state``); k-bit convs as
    ``engines.kbit`` lays them out."""
    if edge.cfg.edge_bits not in PACKED_BITS:
        raise EngineError(f"the packed engine runs 1, 2 and 4-bit edges; this edge has {edge.cfg.edge_bits}-bit "
                          "layers (use --engine onnx or torch)")
    state = {k: v.detach().float().clone() for k, v in edge.state_dict().items()
             if not k.startswith("blocks.") and v.is_floating_point()}
    if edge.cfg.edge_bits != 1:
        from .kbit import kbit_state

        state.update(kbit_state(edge))
        return state
    for name, q in _quant_convs(edge):
        state.update(binary_conv_state(name, q))
    return state


def binary_conv_state(name: str, q) -> dict[str, torch.Tensor]:
    """One binary ``BNQuantConv``'s artifact tensors: sign(W) bits, scale alpha, folded BatchNorm, recipe options."""
    w = q.conv.weight.detach().float()
    out = {f"{name}.bits": pack_bits(w), f"{name}.alpha": w.abs().mean(dim=(1, 2, 3))}
    out[f"{name}.bn_a"], out[f"{name}.bn_b"] = fold_bn(q.bn)
    return {**out, **_option_state(name, q)}


def binary_block_params(state, i: int, cin: int, cout: int, stride: int) -> tuple[list[torch.Tensor], list[int]]:
    """Block ``i``'s arguments of the kernels' ``run_blocks``: per conv bn_a, bn_b, RSign threshold (or empty),
    weight words, weight popcounts, alpha, RPReLU gamma, beta, zeta (or empty); and (cin, cout, stride)."""
    params = []
    for j, ci in ((1, cin), (2, cout)):
        p = f"blocks.{i}.c{j}"
        wt, wpop = kernel_weights(unpack_bits(state[f"{p}.bits"], (cout, ci, 3, 3)))
        params += [state[f"{p}.bn_a"], state[f"{p}.bn_b"], _opt(state, f"{p}.shift"), wt, wpop,
                   state[f"{p}.alpha"].contiguous(), *(_opt(state, f"{p}.{k}") for k in ("rp_g", "rp_b", "rp_z"))]
    return params, [cin, cout, stride]


_EMPTY = torch.empty(0)


def _opt(state, key):
    t = state.get(key)
    return _EMPTY if t is None else t.float().contiguous()


def head_params(head) -> tuple[list[torch.Tensor], list[int]]:
    """An ``ExitHead`` as the native decision's 7 tensors (BatchNorm folded; hidden linear and its folded
    BatchNorm1d, or empty; final linear) and 2 ints (pool kernel, 0 = global; hidden width, 0 = none)."""
    a, b = fold_bn(head.bn)
    if head.hidden is not None:
        lin, bn1 = head.hidden[0], head.hidden[1]
        ha, hb = fold_bn(bn1)
        hidden = [lin.weight.detach().float().contiguous(), ha, hb]
        width = lin.out_features
    else:
        hidden, width = [_EMPTY, _EMPTY, _EMPTY], 0
    k = head.pool.kernel_size if isinstance(head.pool, nn.AvgPool2d) else 0
    k = k[0] if isinstance(k, tuple) else int(k)
    return ([a, b, *hidden, head.fc.weight.detach().float().contiguous(), head.fc.bias.detach().float().contiguous()],
            [k, width])


class PackedEdge:
    """Edge half on the packed engine: ``decide(x, thresholds)`` as ``EdgeNet.decide``, in one native call
    (normalization, float stem, the quantized blocks, exit heads, softmax entropy and the exit rule)."""

    name = "packed"

    def __init__(self, cfg: HybridConfig, state: dict[str, torch.Tensor], isa: int | None = None):
        check_backbone(cfg, "packed")
        if cfg.edge_bits not in PACKED_BITS:
            raise EngineError(f"the packed engine runs 1, 2 and 4-bit edges, not {cfg.edge_bits}-bit ones (8-bit levels "
                              "do not fit its int8 dot products): use --engine onnx or torch")
        if cfg.edge_blocks == 0:
            raise EngineError("this network has no quantized edge blocks: nothing for the packed engine to run")
        self.cfg, self.state = cfg, state
        self.kernels = kernels()
        if cfg.edge_bits != 1 and not hasattr(self.kernels, "run_kblocks"):
            raise EngineError("these packed kernels were built without the k-bit blocks (use --engine torch)")
        # ISA levels: binary blocks and the float parts (best_isa numbering); k-bit blocks (kbit_best_isa numbering).
        # ``isa`` sets the level of the network's own blocks (tests force lower ones).
        kbit = cfg.edge_bits != 1
        self.isa = self.kernels.best_isa() if isa is None or kbit else int(isa)
        self.kisa = (self.kernels.kbit_best_isa() if isa is None else int(isa)) if kbit else -1
        shell = HybridNet(cfg).split()[0].eval()  # the float modules, loaded below; its blocks are not used
        float_keys = {k for k, v in shell.state_dict().items() if not k.startswith("blocks.") and v.is_floating_point()}
        missing = sorted(float_keys - set(state))
        if missing:
            raise EngineError(f"packed artifact lacks {len(missing)} float tensors (e.g. {missing[0]})")
        shell.load_state_dict({k: state[k] for k in float_keys}, strict=False)
        self.shell = shell
        specs = block_specs(cfg)[: cfg.edge_blocks]
        if cfg.edge_bits == 1:
            self.blocks = [binary_block_params(state, i, s.in_ch, s.out_ch, s.stride) for i, s in enumerate(specs)]
        else:
            from .kbit import kbit_block_params

            self.blocks = [kbit_block_params(state, cfg, i, i + 1) for i in range(len(specs))]
        self._runs: dict[tuple[int, int], tuple[list, list]] = {}
        self._native = self._native_args()
        size = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self._prepared = self.kernels.PreparedEdge(*self._native, *size)  # the native decision, built once
        prologue, (params, meta) = self._native[0], self._run(0, cfg.edge_blocks)
        self._prepared_blocks = self.kernels.PreparedEdge(prologue, [params], [meta], [self._kind], [], [], *size)

    @property
    def _kind(self) -> int:
        return 0 if self.cfg.edge_bits == 1 else 1

    def _native_args(self) -> tuple:
        """The arguments of the native ``decide`` that do not depend on the batch."""
        cfg, norm = self.cfg, self.shell.normalize
        prologue = [norm.mean.flatten().float().contiguous(), norm.std.flatten().float().contiguous(),
                    self.shell.stem.weight.detach().float().permute(2, 3, 1, 0).contiguous()]
        bounds = [0] + [cfg.exit_block(j) + 1 for j in range(len(cfg.exits))] + [cfg.edge_blocks]
        segs = [self._run(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        heads = [head_params(self.shell.exits[cfg.exit_key(j)]) for j in range(len(cfg.exits))]
        return (prologue, [p for p, _ in segs], [m for _, m in segs], [self._kind] * len(segs),
                [t for t, _ in heads], [m for _, m in heads])

    @classmethod
    def from_edge(cls, edge: EdgeNet, isa: int | None = None) -> "PackedEdge":
        return cls(edge.cfg, export_state(edge), isa)

    def save(self, path) -> None:
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(path),
                  metadata={"format": PACKED_FORMAT, "network": json.dumps(self.cfg.to_dict(), sort_keys=True)})

    @classmethod
    def load(cls, path, isa: int | None = None) -> "PackedEdge":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != PACKED_FORMAT:
            raise EngineError(f"{path} is not a packed edge artifact ({PACKED_FORMAT})")
        return cls(HybridConfig.from_dict(json.loads(meta["network"])), load_file(str(path)), isa)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return self.shell.feature_shape

    @property
    def isa_name(self) -> str:
        if self._kind == 0:
            return self.kernels.isa_name(self.isa)
        return f"{KBIT_ISA_NAMES[self.kisa]} (k-bit blocks), {self.kernels.isa_name(self.isa)} (float parts)"

    def _run(self, first: int, last: int) -> tuple[list, list]:
        if (first, last) not in self._runs:  # the flat argument lists, built once per run of blocks
            self._runs[first, last] = ([t for p, _ in self.blocks[first:last] for t in p],
                                       [v for _, m in self.blocks[first:last] for v in m])
        return self._runs[first, last]

    def run_blocks(self, h: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Blocks [first, last) on channels-last float features (N, H, W, C)."""
        params, meta = self._run(first, last)
        if self._kind == 0:
            return self.kernels.run_blocks(h, params, meta, self.isa)
        return self.kernels.run_kblocks(h, params, meta, self.kisa)

    def _images(self, x) -> torch.Tensor:
        want = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputShapeError(f"expected images of shape (N, {want[0]}, {want[1]}, {want[2]}), got {got}")
        return x.contiguous() if x.dtype == torch.uint8 else x.float().contiguous()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of every sample after all edge blocks (no exits), as ``EdgeNet.forward``: the native call with
        one run of every block and no exit head."""
        return self._prepared_blocks.decide(self._images(x), [], [], self.isa, self.kisa)[3].permute(0, 3, 1, 2)

    @torch.no_grad()
    def decide(self, x: torch.Tensor, thresholds, temperatures=None) -> EdgeResult:
        """Algorithm 1 at the edge, as ``EdgeNet.decide``, in one native call; features are a channels-last
        (N, C, H, W) view."""
        thr = resolve_thresholds(self.cfg, thresholds)
        temps = (1.0,) * len(thr) if temperatures is None else resolve_thresholds(self.cfg, temperatures, "temperatures")
        preds, decided, ents, feats, idx = self._prepared.decide(self._images(x), list(thr), list(temps), self.isa,
                                                                 self.kisa)
        return EdgeResult(preds, decided, ents, feats.permute(0, 3, 1, 2), idx)


def algorithm1(cfg, n: int, thresholds, temperatures=None):
    """The torch engine's own Algorithm-1 state (``hybrid._Algorithm1``: the exit rule and the bookkeeping of who
    stopped where), shared by every engine so that all apply the exit rule the same way."""
    from ..model.hybrid import _Algorithm1

    thr = resolve_thresholds(cfg, thresholds)
    temps = (1.0,) * len(thr) if temperatures is None else resolve_thresholds(cfg, temperatures, "temperatures")
    return _Algorithm1(thr, temps, n, len(thr), torch.device("cpu"))
