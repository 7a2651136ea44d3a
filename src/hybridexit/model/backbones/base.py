"""What a backbone is to the hybrid: a float stem, an ordered list of blocks (each with its input/output shape and
its convolutions) and a head; ``HybridNet`` quantizes the first blocks, puts exits after chosen blocks and splits at
a block boundary (``model.hybrid``), whatever the backbone.

A backbone is an object with (``cfg`` is a ``HybridConfig``, read by attribute only):

- ``name``, ``family``; ``per_block``: the notation's units per block (2 for the CIFAR ResNets: the paper's
  "layers" are the two convs inside each block, so block b ends at layer 2(b+1); 1 for every other backbone, whose
  split and exits are counted in blocks); ``unit``: the name of that unit ("layer" or "block");
- ``default_edge_bits``: the precision of its quantized edge when none is given;
- ``block_specs(cfg)``: the blocks, in order, as ``BlockSpec`` (shapes and convolutions, for any input size);
- ``stem_shape(cfg)``: (C, H, W) of the stem's output (what the edge sends when it has no blocks);
- ``make_stem(cfg)``, ``make_block(spec, bits, options)``, ``make_head(cfg)``: the float stem, one block at a
  precision (32 = float) and the float head (everything after the last block, on the cloud);
- ``from_torchvision(state_dict)`` (where the family has a torchvision counterpart): a torchvision state dict's
  keys renamed to the hybrid's (``stem.``, ``blocks.<i>.``, ``head.``), values untouched.

Quantized convolutions everywhere follow the paper's QuanConv order: BatchNorm -> activation quantizer -> conv
with quantized weights (``InputQuant`` + ``QuantConv2d``); a float conv is a plain ``nn.Conv2d``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...errors import ConfigError
from ..quant import ActQuantizer, QuantConv2d


@dataclass(frozen=True)
class ConvSpec:
    """One convolution of a block: the module's name inside the block and its geometry."""

    name: str
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    groups: int = 1


@dataclass(frozen=True)
class BlockSpec:
    index: int
    in_ch: int
    out_ch: int
    stride: int
    in_size: int  # spatial size of the block's input (square)
    out_size: int
    kind: str = "basic"
    convs: tuple[ConvSpec, ...] = ()

    @property
    def end_layer(self) -> int:
        """The CIFAR ResNets' paper layer count at the end of this block (block b ends at layer 2(b+1))."""
        return 2 * (self.index + 1)


def conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    """Spatial output size of a convolution or pooling window."""
    return (size + 2 * pad - kernel) // stride + 1


def make_conv(in_ch: int, out_ch: int, kernel: int, stride: int, bits: int, groups: int = 1) -> nn.Conv2d:
    """A bias-free conv with 'same' padding: float (``nn.Conv2d``) at 32 bits, else ``QuantConv2d``; the weight's
    key (``weight``) is the same at every precision."""
    pad = kernel // 2
    if bits == 32:
        return nn.Conv2d(in_ch, out_ch, kernel, stride, pad, groups=groups, bias=False)
    return QuantConv2d(in_ch, out_ch, kernel, stride, pad, groups=groups, bias=False, bits=bits)


class InputQuant(nn.Module):
    """What a quantized conv of a non-CIFAR backbone reads: BatchNorm -> activation quantizer (sign or k-bit), the
    first two steps of the paper's QuanConv. Its BatchNorm is the only state a quantized block has beyond the float
    block's (keys ``q<N>.bn.*``), so float weights (a torchvision checkpoint) initialize a quantized block key for key."""

    def __init__(self, channels: int, bits: int, ste: str = "clip"):
        super().__init__()
        self.bits = bits
        self.bn = nn.BatchNorm2d(channels)
        self.act = ActQuantizer(bits, ste)

    def forward(self, x):
        return self.act(self.bn(x))


def maybe_quant(channels: int, bits: int, ste: str) -> nn.Module | None:
    return None if bits == 32 else InputQuant(channels, bits, ste)


def plain_options(name: str, options: dict) -> str:
    """The edge options a non-CIFAR block computes: ``ste`` only (RSign and RPReLU belong to the CIFAR QuanConv)."""
    bad = [k for k in ("act_shift", "rprelu") if options.get(k)]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: options of the CIFAR ResNets' QuanConv; the {name} backbone's quantized "
                          f"blocks take only ste")
    return options.get("ste", "clip")
