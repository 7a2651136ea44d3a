"""Inference engines for the edge half. Each offers ``decide(x, thresholds, temperatures=None) -> EdgeResult``
with the semantics of ``EdgeNet.decide``; the cloud half stays a torch ``CloudNet``.

- ``torch``: the ``EdgeNet`` itself (float convolutions with quantized weights).
- ``packed``: binary edges as bit-packed XNOR-popcount C++ kernels (``engines.packed``).
"""

from __future__ import annotations

from ..errors import ConfigError

ENGINES = ("torch", "packed")


def available_engines(cfg) -> list[str]:
    """The engines that can run this network's edge here."""
    return ["torch"] + (["packed"] if cfg.edge_bits == 1 else [])


def get_engine(name: str, edge):
    """The edge half ``edge`` (an eval-mode ``EdgeNet``) on engine ``name``."""
    if name == "torch":
        return edge
    if name == "packed":
        from .packed import PackedEdge

        return PackedEdge.from_edge(edge)
    raise ConfigError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
