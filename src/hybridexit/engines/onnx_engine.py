"""The onnx engine: the edge half as an ONNX graph (``onnx_export.edge_model``) on ONNX Runtime, one thread by
default. The graph computes every exit's logits and the features for the whole batch; the exit rule itself
(``exits.exits_here``, temperatures included) runs here on its logits, exactly as the torch engine applies it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputShapeError, need
from ..model.hybrid import EdgeResult
from .packed import algorithm1


def _ort():
    return need("onnxruntime", "the onnx engine")


# ONNX Runtime folds a Mul by a constant into the Conv before it (its weights times the scale): the exact integer
# sum of a k-bit conv (``onnx_export``) would become a float sum of scaled weights, rounded at every step.
KEEP_EXACT = ["ConvMulFusion"]


def session(model_bytes: bytes, threads: int = 1):
    """An ONNX Runtime session on the CPU, ``threads`` threads, without the optimizations in ``KEEP_EXACT``."""
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"], disabled_optimizers=KEEP_EXACT)


class OnnxEdge:
    """Edge half on ONNX Runtime: ``decide(x, thresholds, temperatures=None)`` as ``EdgeNet.decide``."""

    name = "onnx"

    def __init__(self, cfg, model_bytes: bytes, threads: int = 1):
        self.cfg, self.model_bytes = cfg, model_bytes
        self.session = session(model_bytes, threads)
        self.isa_name = "onnxruntime " + _ort().__version__

    @classmethod
    def from_edge(cls, edge, threads: int = 1) -> "OnnxEdge":
        """The engine on ``onnx_export.edge_model(edge)``."""
        from .onnx_export import edge_model

        return cls(edge.cfg, edge_model(edge).SerializeToString(), threads)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        from ..model.resnet import edge_feature_shape

        return edge_feature_shape(self.cfg)

    def save(self, path) -> None:
        with open(path, "wb") as f:
            f.write(self.model_bytes)

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every graph output for raw uint8 images (the one place where input is prepared)."""
        want = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want or x.dtype != torch.uint8:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputShapeError(f"the onnx engine takes raw uint8 images (N, {want[0]}, {want[1]}, {want[2]}), got {got}")
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, {"images": x.contiguous().numpy()})
        return {n: torch.from_numpy(o) for n, o in zip(names, outs)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)["features"]

    def decide(self, x: torch.Tensor, thresholds, temperatures=None) -> EdgeResult:
        state = algorithm1(self.cfg, x.shape[0], thresholds, temperatures)
        out = self.run(x)
        for j in range(len(self.cfg.exits)):
            if state.idx.numel() == 0:
                break
            state(j, nn.Identity(), out[f"logits_{j}"][state.idx])  # the graph computed every exit's logits
        return EdgeResult(state.preds, state.decided, state.ents, out["features"][state.idx], state.idx)


class OnnxCloud:
    """The cloud half as float ONNX (``onnx_export.cloud_model``): ``cloud(features) -> logits``."""

    def __init__(self, cloud, threads: int = 1):
        from .onnx_export import cloud_model

        self.model_bytes = cloud_model(cloud).SerializeToString()
        self.session = session(self.model_bytes, threads)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["logits"], {"features": features.float().contiguous().numpy()})[0])
