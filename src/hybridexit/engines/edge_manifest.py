"""``edge.json``: what a device needs beside the packed artifact to run the edge without this package (and torch).

``hybridexit export CKPT --format packed`` writes it next to ``edge.packed.safetensors``; the hybridexit-edge
package (``edge/``) reads both. It holds the structure the torch engine derives from the network config (the
quantized blocks, where each exit sits and its head's pooling and hidden layer, the normalization), the checkpoint's
fingerprint (the cloud checks it), its exit policy and class names, and the energy model's per-image costs (the
summary's energy rows), so that the device computes the same records and summary as ``hybridexit edge``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

MANIFEST = "edge.json"
MANIFEST_FORMAT = "hybridexit-edge-manifest-1"


def _head(head) -> dict:
    k = head.pool.kernel_size if isinstance(head.pool, nn.AvgPool2d) else 0
    d = {"pool": int(k[0] if isinstance(k, tuple) else k), "bn_eps": float(head.bn.eps), "hidden": 0}
    if head.hidden is not None:
        d.update(hidden=int(head.hidden[0].out_features), hidden_bn_eps=float(head.hidden[1].eps))
    return d


def manifest(checkpoint, artifact: Path) -> dict:
    """The manifest of a checkpoint's packed edge artifact (already written at ``artifact``)."""
    from ..model.checkpoint import fingerprint, load_model
    from ..model.energy import energy_report
    from ..model.hybrid import resolve_thresholds
    from ..model.resnet import block_specs

    model, meta = load_model(checkpoint)
    cfg = model.cfg
    edge, _ = model.split()
    policy = meta.get("policy")
    thresholds = resolve_thresholds(cfg, policy.thresholds if policy else None) if policy else None
    report = energy_report(cfg)
    exits = []
    for j in range(len(cfg.exits)):
        key = cfg.exit_key(j)
        exits.append({"key": f"exits.{key}", "after_block": cfg.exit_block(j) + 1, **_head(edge.exits[key])})
    return {
        "format": MANIFEST_FORMAT,
        "artifact": artifact.name,
        "artifact_sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(),
        "fingerprint": fingerprint(checkpoint),
        "checkpoint": Path(checkpoint).name,
        "classes": meta.get("data", {}).get("classes"),
        "num_classes": cfg.num_classes,
        "thresholds": list(thresholds) if thresholds is not None else None,
        "temperatures": list(policy.temperatures) if policy and policy.temperatures else None,
        "input": {"channels": cfg.in_channels, "size": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std)},
        "bits": cfg.edge_bits,
        "act_shift": bool(cfg.act_shift),
        "rprelu": bool(cfg.rprelu),
        "blocks": [{"cin": s.in_ch, "cout": s.out_ch, "stride": s.stride} for s in block_specs(cfg)[: cfg.edge_blocks]],
        "exits": exits,
        "feature_shape": list(edge.feature_shape),
        "energy_uj": {"fp32": report.fp32_uj, "edge": report.edge_uj, "cloud": report.cloud_uj,
                      "exit_path": list(report.exit_path_uj)},
    }


def write_manifest(checkpoint, artifact) -> Path:
    """``edge.json`` beside the packed ``artifact`` of ``checkpoint``."""
    artifact = Path(artifact)
    path = artifact.parent / MANIFEST
    path.write_text(json.dumps(manifest(checkpoint, artifact), indent=1) + "\n")
    return path
