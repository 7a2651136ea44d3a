"""Every exit's statistics on a split, what calibration chooses thresholds on: ``collect_exit_stats`` runs the whole
network once (no exiting) to get every exit's logits and the final prediction for every sample; ``ExitStats.simulate``
applies the same exit rule (``exits.exits_here``) exit after exit, so its decisions are those of a conditional run with
those thresholds (tests check this). Images are raw (uint8): the network normalizes them itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..data import Split, batches
from ..model.exits import exit_rule, exits_here
from ..model.hybrid import CLOUD


def progress_batches(split: Split, batch_size: int, desc: str, progress: bool):
    """``batches`` of a split with a progress bar (shown when ``progress``)."""
    return tqdm(batches(split, batch_size), total=math.ceil(len(split) / batch_size), desc=desc,
                disable=not progress, leave=False)


@dataclass
class ExitStats:
    """Every exit's logits and the final prediction for every sample (no exiting)."""

    exit_logits: torch.Tensor  # (N, K, classes)
    final_preds: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)

    @property
    def exit_preds(self) -> torch.Tensor:
        return self.exit_logits.argmax(2)

    def entropies_at(self, temperatures=None) -> torch.Tensor:
        """(N, K) entropies of every exit under the exit rule (with these softmax temperatures)."""
        k = self.exit_logits.shape[1]
        temps = temperatures or (1.0,) * k
        cols = [exits_here(self.exit_logits[:, j], 0.0, temps[j])[1] for j in range(k)]
        return torch.stack(cols, 1) if cols else torch.zeros(len(self.labels), 0)

    @property
    def entropies(self) -> torch.Tensor:
        return self.entropies_at()

    def accuracy(self, preds: torch.Tensor) -> float:
        """Exact fraction of ``preds`` equal to the labels (counted as integers: no float32 rounding)."""
        return int((preds == self.labels).sum()) / max(len(self.labels), 1)

    @property
    def cloud_accuracy(self) -> float:
        return self.accuracy(self.final_preds)

    def simulate(self, thresholds, temperatures=None, entropies: torch.Tensor | None = None):
        """(predictions, decided_at) that Algorithm 1 gives with these thresholds: the exit rule ``exits_here``
        applied exit after exit (pass precomputed ``entropies`` to sweep many thresholds quickly)."""
        ents = self.entropies_at(temperatures) if entropies is None else entropies
        n, k = ents.shape
        preds = self.final_preds.clone()
        decided = torch.full((n,), CLOUD, dtype=torch.long)
        open_ = torch.ones(n, dtype=torch.bool)
        exit_preds = self.exit_preds
        for j in range(k):
            stop = open_ & exit_rule(ents[:, j], thresholds[j])
            preds[stop] = exit_preds[stop, j]
            decided[stop] = j
            open_ &= ~stop
        return preds, decided


@torch.no_grad()
def collect_exit_stats(model, split: Split, batch_size: int = 500, device=None, progress: bool = False) -> ExitStats:
    device = device or next(model.parameters()).device
    model.eval()
    logits, finals = [], []
    k = len(model.cfg.exits)
    for images, _ in progress_batches(split, batch_size, "exit stats", progress):
        outs = model(images.to(device))
        logits.append(torch.stack(outs[:-1], 1).float().cpu() if k
                      else torch.zeros(len(images), 0, model.cfg.num_classes))
        finals.append(outs[-1].argmax(1).cpu())
    return ExitStats(torch.cat(logits), torch.cat(finals), split.labels.clone())
