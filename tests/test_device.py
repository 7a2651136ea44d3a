"""The device every command picks, and its arithmetic: IEEE FP32 on CUDA, so calibrated thresholds hold across
machines (TF32 convolutions move a binary network's exits: results/tf32.json)."""

import torch

from hybridexit.device import pick_device


def _precisions():
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


def test_cuda_computes_in_ieee_fp32_and_the_cpu_is_left_alone():
    before = _precisions()
    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # PyTorch's default for cuDNN convolutions
        assert pick_device("cpu") == torch.device("cpu") and _precisions()[0] == "tf32"
        assert pick_device("cuda:0") == torch.device("cuda:0")  # no GPU needed to pick it
        assert _precisions() == ("ieee", "ieee")
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


def test_the_default_is_cuda_when_present_else_the_cpu():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
