"""Temperature scaling of the exit heads (Guo et al. 2017): one scalar T per exit, fitted on held-out data.

An exit's softmax(logits / T) with T > 1 is less confident than softmax(logits). T is chosen to minimize the
negative log-likelihood of the labels under softmax(logits / T). The NLL is convex in the inverse temperature
b = 1 / T (a log-sum-exp of affine functions of b minus a linear term), so a bounded golden-section search over b
finds the minimum to the search tolerance; no gradient or step size to tune. The exit rule reads the entropy of
softmax(logits / T) (``exits.exits_here``), so a fitted T moves every entropy the thresholds are compared with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

T_MIN, T_MAX = 0.05, 20.0  # the search interval of T; a fit at an end says the logits carry little information


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / temperature)."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, tol: float = 1e-4) -> float:
    """The temperature in [T_MIN, T_MAX] minimizing the NLL of ``labels`` under softmax(logits / T)."""
    if logits.dim() != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ConfigError(f"fit_temperature needs (N, C) logits and N labels, N > 0; got {tuple(logits.shape)} "
                          f"and {tuple(labels.shape)}")
    z, y = logits.double(), labels.long()
    f = lambda b: float(F.cross_entropy(z * b, y))  # NLL as a function of b = 1 / T (convex)
    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = f(c), f(d)
    while hi - lo > tol * (1 + lo):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = f(d)
    return 1.0 / ((lo + hi) / 2)


def fit_temperatures(exit_logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, ...]:
    """One temperature per exit: ``exit_logits`` is (N, K, C)."""
    if exit_logits.dim() != 3:
        raise ConfigError(f"exit logits must be (N, K, C), got {tuple(exit_logits.shape)}")
    return tuple(fit_temperature(exit_logits[:, j], labels) for j in range(exit_logits.shape[1]))


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                               bins: int = 15) -> float:
    """ECE of softmax(logits / T): the confidence-weighted gap between confidence and accuracy, equal-width bins."""
    p = F.softmax(logits.double() / temperature, dim=1)
    conf, pred = p.max(1)
    right = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += float(m.double().mean() * (conf[m].mean() - right[m].mean()).abs())
    return ece
