"""Where the networks run, and in what arithmetic: the default device, and IEEE FP32 on CUDA.

PyTorch runs CUDA convolutions in TF32 by default (10 mantissa bits for the operands). A binary edge turns such
small changes of a pre-activation into sign flips, so the same checkpoint exits and classifies differently on a
GPU and on a CPU: on CIFAR-10 validation a 20E binary network's final classifier read 88.20 % on an H200 and
88.74 % on the CPU, and an emulation of TF32 on the CPU reproduces the GPU's figures
(``benchmarks/tf32.py``, ``results/tf32.json``). Every device this library picks therefore computes in IEEE FP32,
so thresholds calibrated on one machine hold on another.
"""

from __future__ import annotations

import torch


def ieee_fp32() -> None:
    """Turn TF32 off for CUDA convolutions and matrix products (process-wide; a no-op without CUDA)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the per-backend precision API
        conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def pick_device(device=None) -> torch.device:
    """``device`` (a name or torch.device), else CUDA when present, else the CPU; CUDA set to IEEE FP32."""
    d = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.type == "cuda":
        ieee_fp32()
    return d
