"""Inference engines for the edge half. Each offers ``decide(x, thresholds, temperatures=None) -> EdgeResult``
with the semantics of ``EdgeNet.decide`` and ``forward(x)`` (edge features, no exits); the cloud half stays a
torch ``CloudNet``.

- ``torch``: the ``EdgeNet`` itself (float convolutions on quantized values).
- ``packed``: binary edges as bit-packed XNOR-popcount C++ kernels (``engines.packed``).
- ``onnx``: the edge as an ONNX graph with ``QLinearConv`` binary convs on ONNX Runtime (``engines.onnx_engine``).
"""

from __future__ import annotations

import importlib.util

from ..errors import ConfigError, EngineError

ENGINES = ("torch", "onnx", "packed")


def unsupported_options(cfg, engine: str) -> list[str]:
    """The network's recipe options (``resnet.OPTION_DEFAULTS``) that ``engine`` does not compute. ``ste`` only
    changes training gradients; the packed engine runs its exits as torch modules (any pool, any hidden width)
    but only plain binary convs; the onnx graph has plain convs and one-linear exits with k3 or global pooling."""
    out = [name for name, on in (("act_shift (RSign)", cfg.act_shift), ("rprelu (RPReLU)", cfg.rprelu)) if on]
    if engine == "onnx":
        out += [f"exit_hidden={cfg.exit_hidden}"] if cfg.exit_hidden else []
        out += [f"exit_pool={cfg.exit_pool}"] if cfg.exit_pool not in ("k3", "global") else []
    return out


def check_options(cfg, engine: str) -> None:
    """Refuse a network whose options ``engine`` would not compute (instead of computing another network)."""
    bad = unsupported_options(cfg, engine)
    if bad:
        raise EngineError(f"the {engine} engine runs the paper's plain binary convs and exits; this network uses "
                          f"{', '.join(bad)}: use --engine torch")


def available_engines(cfg) -> list[str]:
    """The engines that can run this network's edge here."""
    names = ["torch"]
    if (cfg.edge_bits in (1, 32) and importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx")
            and not unsupported_options(cfg, "onnx")):
        names.append("onnx")
    if cfg.edge_bits == 1 and not unsupported_options(cfg, "packed"):
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
