"""The k-bit (2- and 4-bit) edge on integer kernels: export of an EdgeNet's k-bit blocks and their kernel layout.

A k-bit QuanConv (``quant.BNQuantConv``: BatchNorm -> [RSign shift] -> k-bit activation quantizer -> conv with
weights ``s_c Q_k(W / s_c)`` -> [RPReLU]) computes, with Z = 2^k - 1, activation levels q in {0 .. Z} (value
(2q - Z) / Z) and weight levels r in {0 .. Z} (value s_c (2r - Z) / Z):

    conv = s_c / Z^2 * sum (2q - Z) (2r - Z)        (zero padding: the padded taps contribute 0)

The integer sum is computed exactly by the kernels (``csrc/kbit.cpp``: int8 dot products, VNNI / maddubs, see
``csrc/kbit.h`` for the byte encoding u = 2q, w = 2r - Z and the layouts) and scaled by ``mult = s_c / Z^2`` in
float32; BatchNorm, shift and quantization of the next conv, RPReLU and the float residual add are fused.

Artifact (``kbit_state``), per k-bit conv ``blocks.{i}.c{j}``:
- ``levels``: uint8, the weight levels r packed k bits each, little bit order, in (O, C, 3, 3) element order
  (two weights per byte at 4 bits, four at 2 bits);
- ``scale``: float32 (O), s_c = max |W[c]| (clamped at 1e-8 as in training);
- ``bn_a``, ``bn_b``: float32 (C), the preceding BatchNorm folded as ``packed.fold_bn``;
- ``shift``: float32 (C), the RSign threshold, only with ``act_shift``;
- ``rp_gamma``, ``rp_beta``, ``rp_zeta``: float32 (O), RPReLU's shift in, slope, shift out, only with ``rprelu``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EngineError
from ..model.quant import weight_levels
from ..model.resnet import HybridConfig, block_specs
from .folding import fold_bn

KBITS = (2, 4)
TENSORS_PER_CONV = 9  # bn_a, bn_b, shift, wk, wbias, mult, rp_gamma, rp_beta, rp_zeta (csrc/kbit.h)


def _z(bits: int) -> int:
    if bits not in KBITS:
        raise EngineError(f"the k-bit kernels run 2- and 4-bit edges, not {bits}-bit ones")
    return 2**bits - 1


def pack_levels(r: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels (0 .. 2^bits - 1) at ``bits`` bits each: uint8, little bit order, in r's element order."""
    flat = r.flatten().numpy().astype(np.uint8)
    planes = ((flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(-1)
    return torch.from_numpy(np.packbits(planes, bitorder="little"))


def unpack_levels(packed: torch.Tensor, shape, bits: int) -> torch.Tensor:
    n = int(np.prod(shape))
    planes = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(1)).reshape(shape)


def kernel_kweights(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel layout of signed weights ``w = 2r - Z`` (integer (O, C, 3, 3)): ``wk`` int8 (9, G, opad, 4) with
    input channels 4g .. 4g + 3 of output channel o, tap t = 3 ky + kx at [t, g, o] (G = ceil(C / 4), opad = O
    rounded up to 16, zero-filled), and ``wbias`` int32 (opad): -Z times the sum of each channel's weights, the
    term that makes the byte encoding of the activations (u = a + Z, padding u = Z) exact (csrc/kbit.h)."""
    o, c = w.shape[:2]
    g, opad = (c + 3) // 4, (o + 15) // 16 * 16
    wk = torch.zeros(9, g * 4, opad, dtype=torch.int8)
    wk[:, :c, :o] = w.to(torch.int8).permute(2, 3, 1, 0).reshape(9, c, o)  # (ky, kx, C, O)
    wk = wk.view(9, g, 4, opad).permute(0, 1, 3, 2).contiguous()
    wbias = torch.zeros(opad, dtype=torch.int32)
    wbias[:o] = (-_z(bits) * w.to(torch.int64).sum(dim=(1, 2, 3))).to(torch.int32)
    return wk, wbias


def _kbit_convs(edge):
    for i, block in enumerate(edge.blocks):
        for j, q in ((1, block.c1), (2, block.c2)):
            yield f"blocks.{i}.c{j}", q


def kbit_state(edge) -> dict[str, torch.Tensor]:
    """The artifact tensors of a k-bit EdgeNet's blocks (module docstring); the float stem, exits and
    normalization are not included (they are the torch state dict's own)."""
    bits = edge.cfg.edge_bits
    _z(bits)
    state = {}
    for name, q in _kbit_convs(edge):
        r, scale = weight_levels(q.conv.weight, bits)
        state[f"{name}.levels"] = pack_levels(r, bits)
        state[f"{name}.scale"] = scale
        state[f"{name}.bn_a"], state[f"{name}.bn_b"] = fold_bn(q.bn)
        if q.shift is not None:
            state[f"{name}.shift"] = q.shift.bias.detach().float().contiguous()
        if q.rprelu is not None:
            for key, p in (("rp_gamma", q.rprelu.shift_in), ("rp_beta", q.rprelu.slope), ("rp_zeta", q.rprelu.shift_out)):
                state[f"{name}.{key}"] = p.detach().float().contiguous()
    return state


def kconv_params(state: dict[str, torch.Tensor], name: str, cin: int, cout: int, bits: int, act_shift: bool = False,
                 rprelu: bool = False) -> list[torch.Tensor]:
    """The 9 ``run_kblocks`` tensors of k-bit conv ``name`` (csrc/kbit.h): bn_a, bn_b, shift, wk, wbias, mult,
    rp_gamma, rp_beta, rp_zeta (an absent option's tensors are empty)."""
    z = _z(bits)
    empty = torch.empty(0)
    r = unpack_levels(state[f"{name}.levels"], (cout, cin, 3, 3), bits)
    wk, wbias = kernel_kweights(2 * r - z, bits)
    mult = (state[f"{name}.scale"].double() / z**2).float().contiguous()
    shift = state[f"{name}.shift"] if act_shift else empty
    rp = [state[f"{name}.{k}"] for k in ("rp_gamma", "rp_beta", "rp_zeta")] if rprelu else [empty] * 3
    return [state[f"{name}.bn_a"], state[f"{name}.bn_b"], shift, wk, wbias, mult, *rp]


def kbit_block_params(state: dict[str, torch.Tensor], cfg: HybridConfig, first: int = 0,
                      last: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """The flat ``run_kblocks`` arguments for edge blocks [first, last): per block 18 tensors (conv 1's 9, then
    conv 2's: bn_a, bn_b, shift, wk, wbias, mult, rp_gamma, rp_beta, rp_zeta; absent options are empty tensors)
    and 4 ints (cin, cout, stride, bits). See csrc/kbit.h."""
    last = cfg.edge_blocks if last is None else last
    if not 0 <= first < last <= cfg.edge_blocks:
        raise EngineError(f"blocks [{first}, {last}) are not a run of this edge's {cfg.edge_blocks} blocks")
    params, meta = [], []
    for s in block_specs(cfg)[first:last]:
        for j, cin in ((1, s.in_ch), (2, s.out_ch)):
            params += kconv_params(state, f"blocks.{s.index}.c{j}", cin, s.out_ch, cfg.edge_bits, cfg.act_shift,
                                   cfg.rprelu)
        meta += [s.in_ch, s.out_ch, s.stride, cfg.edge_bits]
    return params, meta
