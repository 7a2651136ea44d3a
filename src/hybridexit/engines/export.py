"""``hybridexit export``: a checkpoint's halves as files a device runtime loads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from ..model.checkpoint import load_model

FILES = {"onnx": ("edge.onnx", "cloud.onnx"), "packed": ("edge.packed.safetensors", "edge.json")}


def export_checkpoint(checkpoint, fmt: str, out) -> dict:
    """Write the edge half (and, for onnx, the cloud half) into ``out``; returns the files and their sizes, and
    the size of the same edge as a float safetensors state dict for comparison."""
    model, _ = load_model(checkpoint)
    edge, cloud = model.split()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "packed":
        from .packed import PackedEdge

        PackedEdge.from_edge(edge.eval()).save(out / FILES[fmt][0])
        from .edge_manifest import write_manifest

        write_manifest(checkpoint, out / FILES[fmt][0])  # what the hybridexit-edge package (edge/) reads beside it
    else:
        from .onnx_export import cloud_model, edge_model

        (out / FILES[fmt][0]).write_bytes(edge_model(edge.eval()).SerializeToString())
        (out / FILES[fmt][1]).write_bytes(cloud_model(cloud.eval()).SerializeToString())
    with tempfile.TemporaryDirectory() as d:
        save_file({k: v.contiguous() for k, v in edge.state_dict().items()}, f"{d}/edge.safetensors")
        float_bytes = os.path.getsize(f"{d}/edge.safetensors")
    for name in FILES[fmt]:  # safetensors writes 0600; an exported artifact is meant to be copied to a device
        os.chmod(out / name, 0o644)
    files = {name: (out / name).stat().st_size for name in FILES[fmt]}
    return {"format": fmt, "out": str(out), "files": files, "edge_bytes": files[FILES[fmt][0]],
            "edge_float_bytes": float_bytes}
