"""Inference engines for the edge half. Each offers ``decide(x, thresholds, temperatures=None) -> EdgeResult``
with the semantics of ``EdgeNet.decide`` and ``forward(x)`` (edge features, no exits); the cloud half stays a
torch ``CloudNet``.

- ``torch``: the ``EdgeNet`` itself (float convolutions on quantized values).
- ``packed``: the whole edge decision in one native call: binary blocks as bit-packed XNOR-popcount kernels,
  k-bit blocks as integer dot products (``engines.packed``, ``engines.kbit``, ``csrc/``).
- ``onnx``: the edge as an ONNX graph on ONNX Runtime, binary convs as ``QLinearConv``, k-bit convs as exact
  integer sums (``engines.onnx_export``, ``engines.onnx_engine``).
The onnx and packed engines build the CIFAR ResNets' edge; other backbones (``model.backbones``) run on torch, which
``auto`` picks for them, and the others refuse them in one line (``check_backbone``).

May import: errors, device, threads, data, model.
"""

from __future__ import annotations

import importlib.util

from ..errors import ConfigError, EngineError

ENGINES = ("torch", "onnx", "packed")
CHOICES = ("auto", *ENGINES)  # what --engine accepts: auto = the fastest engine that can run the checkpoint here
AUTO_ORDER = ("packed", "onnx", "torch")  # fastest first (results/edge_speed.json)
PACKED_BITS = (1, 2, 4)  # the edge bits the packed engine runs (engines.packed)


def unsupported_options(cfg, engine: str) -> list[str]:
    """The network's recipe options (``resnet.OPTION_DEFAULTS``) that ``engine`` does not compute. ``ste`` only
    changes training gradients; the packed engine computes every option natively (RSign folded into the
    sign-and-pack threshold, RPReLU in the conv epilogue, any exit head: ``engines.packed``); the onnx graph
    computes every option (``engines.onnx_export``)."""
    if engine == "packed":  # every network the trainer makes: binary and k-bit edges, every recipe option
        return []
    if engine == "onnx":  # every network the trainer makes: binary, k-bit and float edges, every recipe option
        return []
    out = [name for name, on in (("act_shift (RSign)", cfg.act_shift), ("rprelu (RPReLU)", cfg.rprelu)) if on]
    return out


def check_options(cfg, engine: str) -> None:
    """Refuse a network whose options ``engine`` would not compute (instead of computing another network)."""
    bad = unsupported_options(cfg, engine)
    if bad:
        raise EngineError(f"the {engine} engine runs the paper's plain binary convs and exits; this network uses "
                          f"{', '.join(bad)}: use --engine torch")


NATIVE_BACKBONES = ("cifar_resnet",)  # the backbone families the onnx and packed engines build their edge for


def check_backbone(cfg, engine: str) -> None:
    """Refuse, in one line, to run a backbone ``engine`` has no edge graph or kernels for (the onnx and packed
    engines build the CIFAR ResNets' blocks; every backbone runs on torch, which ``auto`` picks for them)."""
    if engine in ("onnx", "packed") and cfg.backbone_def.family not in NATIVE_BACKBONES:
        raise EngineError(f"the {engine} engine runs the CIFAR ResNets' edge blocks, not {cfg.backbone_name}'s: use "
                          f"--engine torch (what --engine auto picks for it)")


def available_engines(cfg) -> list[str]:
    """The engines that can run this network's edge here."""
    names = ["torch"]
    if cfg.backbone_def.family not in NATIVE_BACKBONES:
        return names
    if (importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx")
            and not unsupported_options(cfg, "onnx")):
        names.append("onnx")
    if cfg.edge_bits in PACKED_BITS and cfg.edge_blocks:
        names.append("packed")
    return names


def resolve_engine(name: str, cfg, device="cpu") -> str:
    """The concrete engine ``name`` stands for: itself, or for ``auto`` the first of ``AUTO_ORDER`` that can run
    the network here (packed and onnx run on the CPU; the packed kernels must build: a machine without a C++
    compiler falls back to the next)."""
    if name != "auto":
        if name not in ENGINES:
            raise ConfigError(f"unknown engine {name!r}: use one of {', '.join(CHOICES)}")
        return name
    if str(device).split(":")[0] != "cpu":
        return "torch"
    usable = available_engines(cfg)
    for cand in AUTO_ORDER:
        if cand == "packed" and cand in usable:
            try:
                from .native import kernels

                kernels()
            except EngineError:
                continue
        if cand in usable:
            return cand
    return "torch"


def engine_name(engine) -> str:
    """The name of an engine object returned by ``get_engine``."""
    return getattr(engine, "name", "torch")


def get_engine(name: str, edge):
    """The edge half ``edge`` (an eval-mode ``EdgeNet``) on engine ``name`` (``auto``: ``resolve_engine``)."""
    if name == "auto":
        name = resolve_engine(name, edge.cfg, next(edge.parameters()).device)
    if name == "torch":
        return edge
    check_backbone(edge.cfg, name)
    if name == "packed":
        from .packed import PackedEdge

        return PackedEdge.from_edge(edge)
    if name == "onnx":
        from .onnx_engine import OnnxEdge

        return OnnxEdge.from_edge(edge)
    raise ConfigError(f"unknown engine {name!r}: use one of {', '.join(CHOICES)}")
