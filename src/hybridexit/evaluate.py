"""Evaluation with real conditional execution, per-image records, and the summary shared with the runtime.

``evaluate_conditional`` splits the checkpoint's network into EdgeNet / CloudNet and runs Algorithm 1 batch by
batch: the cloud half sees only the samples that did not exit. ``collect_exit_stats`` runs the whole network once
(no exiting) to get every exit's entropy and prediction and the final prediction for every sample; calibration
sweeps thresholds over those (the exit rule depends only on the entropies, so the decisions are the same as a
conditional run with those thresholds; tests check this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .data import Split, batches, normalize
from .energy import EnergyReport, energy_report
from .exits import entropy
from .hybrid import CLOUD, conditional_inference, decided_label


def prepare_images(images, mean, std, device):
    """uint8 images -> normalized float, channels-last: the one preprocessing of evaluation and the edge."""
    return normalize(images.to(device), mean, std).contiguous(memory_format=torch.channels_last)


def records_from(decisions, labels: torch.Tensor, start: int) -> list[dict]:
    out = []
    for i in range(len(labels)):
        ents = [round(float(v), 6) for v in decisions.entropies[i].tolist() if not math.isnan(v)]
        out.append({"index": start + i, "label": int(labels[i]), "prediction": int(decisions.predictions[i]),
                    "decided_at": decided_label(int(decisions.decided_at[i])), "entropies": ents})
    return out


@torch.no_grad()
def evaluate_conditional(model, split: Split, mean, std, thresholds=None, batch_size: int = 500,
                         device=None, progress: bool = False) -> list[dict]:
    """Per-image records of a real conditional run (edge half, exits, then cloud half on what is left)."""
    device = device or next(model.parameters()).device
    edge, cloud = model.split()
    edge, cloud = edge.eval().to(device), cloud.eval().to(device)
    thr = edge.resolve_thresholds(thresholds)
    recs: list[dict] = []
    start = 0
    for images, labels in tqdm(batches(split, batch_size), total=math.ceil(len(split) / batch_size),
                               desc="evaluate", disable=not progress, leave=False):
        d = conditional_inference(edge, cloud, prepare_images(images, mean, std, device), thr)
        recs.extend(records_from(d, labels, start))
        start += len(labels)
    return recs


@dataclass
class ExitStats:
    """Every exit's entropy and prediction and the final prediction for every sample (no exiting)."""

    entropies: torch.Tensor  # (N, K)
    exit_preds: torch.Tensor  # (N, K)
    final_preds: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)

    def accuracy(self, preds: torch.Tensor) -> float:
        """Exact fraction of ``preds`` equal to the labels (counted as integers: no float32 rounding)."""
        return int((preds == self.labels).sum()) / max(len(self.labels), 1)

    @property
    def cloud_accuracy(self) -> float:
        return self.accuracy(self.final_preds)

    def simulate(self, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, decided_at) that Algorithm 1 gives with these thresholds."""
        n, k = self.entropies.shape
        preds = self.final_preds.clone()
        decided = torch.full((n,), CLOUD, dtype=torch.long)
        open_ = torch.ones(n, dtype=torch.bool)
        for j in range(k):
            stop = open_ & (self.entropies[:, j] < thresholds[j])
            preds[stop] = self.exit_preds[stop, j]
            decided[stop] = j
            open_ &= ~stop
        return preds, decided


@torch.no_grad()
def collect_exit_stats(model, split: Split, mean, std, batch_size: int = 500, device=None,
                       progress: bool = False) -> ExitStats:
    device = device or next(model.parameters()).device
    model.eval()
    ents, preds, finals = [], [], []
    for images, _ in tqdm(batches(split, batch_size), total=math.ceil(len(split) / batch_size),
                          desc="exit stats", disable=not progress, leave=False):
        outs = model(prepare_images(images, mean, std, device))
        k = len(outs) - 1
        ents.append(torch.stack([entropy(o) for o in outs[:-1]], 1).cpu() if k else torch.zeros(len(images), 0))
        preds.append(torch.stack([o.argmax(1) for o in outs[:-1]], 1).cpu() if k
                     else torch.zeros(len(images), 0, dtype=torch.long))
        finals.append(outs[-1].argmax(1).cpu())
    return ExitStats(torch.cat(ents), torch.cat(preds), torch.cat(finals), split.labels.clone())


def summarize(records: list[dict], report: EnergyReport, cloud_accuracy: float | None = None) -> dict:
    """The summary of ``hybridexit evaluate --json`` (the edge runtime adds its own keys to it).

    Fractions and accuracies are numbers in [0, 1]. ``expected_uj`` and ``reduction`` use the measured exit
    fractions; samples decided by ``fallback`` (cloud unreachable) are counted as having paid the edge only.
    """
    n = len(records)
    k = len(report.config.exits)
    counts = [0] * k
    fallback = 0
    for r in records:
        d = r["decided_at"]
        if d.startswith("exit:"):
            counts[int(d[5:])] += 1
        elif d == "fallback":
            fallback += 1
    fr = [c / n if n else 0.0 for c in counts]
    exp = report.expected_uj(fr) if n else 0.0
    if fallback and n:  # fallback samples never reached the cloud: remove the cloud cost they did not pay
        exp -= fallback / n * report.cloud_uj
    correct = sum(r["prediction"] == r["label"] for r in records)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "exit_fraction": fr,
        "edge_fraction": sum(fr),
        "cloud_fraction": (n - sum(counts) - fallback) / n if n else 0.0,
        "fallback_fraction": fallback / n if n else 0.0,
        "cloud_accuracy": cloud_accuracy,
        "thresholds": list(report.config.thresholds),
        "fp32_uj": report.fp32_uj,
        "edge_uj": report.edge_uj,
        "cloud_uj": report.cloud_uj,
        "expected_uj": exp,
        "reduction": report.fp32_uj / exp if exp > 0 else float("inf"),
    }


def evaluate_checkpoint_summary(model, split: Split, mean, std, thresholds=None, batch_size=500, device=None,
                                progress=False) -> tuple[dict, list[dict]]:
    """Conditional run + the accuracy of the final classifier alone (``cloud_accuracy``), summarized."""
    cfg = model.cfg if thresholds is None else model.cfg.replace(thresholds=tuple(thresholds))
    recs = evaluate_conditional(model, split, mean, std, cfg.thresholds, batch_size, device, progress)
    stats = collect_exit_stats(model, split, mean, std, batch_size, device, progress)
    report = energy_report(cfg)
    return summarize(recs, report, stats.cloud_accuracy), recs
