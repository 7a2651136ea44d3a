"""Inference engines for the edge half. Each offers ``decide(x, thresholds, temperatures=None) -> EdgeResult``
with the semantics of ``EdgeNet.decide`` and ``forward(x)`` (edge features, no exits); the cloud half stays a
torch ``CloudNet``.

- ``torch``: the ``EdgeNet`` itself (float convolutions on quantized values).
- ``packed``: binary edges as bit-packed XNOR-popcount C++ kernels (``engines.packed``).
- ``onnx``: the edge as an ONNX graph with ``QLinearConv`` binary convs on ONNX Runtime (``engines.onnx_engine``).
"""

from __future__ import annotations

import importlib.util

from ..errors import ConfigError

ENGINES = ("torch", "onnx", "packed")


def available_engines(cfg) -> list[str]:
    """The engines that can run this network's edge here."""
    names = ["torch"]
    if cfg.edge_bits in (1, 32) and importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        names.append("onnx")
    if cfg.edge_bits == 1:
        names.append("packed")
    return names


def get_engine(name: str, edge):
    """The edge half ``edge`` (an eval-mode ``EdgeNet``) on engine ``name``."""
    if name == "torch":
        return edge
    if name == "packed":
        from .packed import PackedEdge

        return PackedEdge.from_edge(edge)
    if name == "onnx":
        from .onnx_engine import OnnxEdge

        return OnnxEdge.from_edge(edge)
    raise ConfigError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
