"""Per-input decision records and the summary that ``evaluate`` and the edge runtime share.

A decision is typed: ``exit`` is the exit index (an int) for inputs answered at the edge, and ``route`` says
where the answer came from (``Route.EXIT``, ``Route.CLOUD``, ``Route.FALLBACK`` when the cloud failed and the
edge's last exit answered, or ``Route.LOCAL`` when the adaptive edge ran the whole network itself). Strings such
as ``"exit:0"`` exist only in the JSON form (``to_json`` / ``from_json``), the JSONL files ``evaluate --out`` and
``edge --out`` write.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .energy import EnergyReport
from .hybrid import CLOUD, FALLBACK


class Route(enum.Enum):
    EXIT = "exit"
    CLOUD = "cloud"
    FALLBACK = "fallback"
    LOCAL = "local"  # the adaptive edge ran the rest of the network itself (runtime/adaptive_edge.py)


@dataclass(frozen=True)
class Decision:
    index: int
    prediction: int
    route: Route
    exit: int | None  # the exit that answered (Route.EXIT), else None
    entropies: tuple[float, ...]  # at each exit the input reached
    label: int | None = None  # None when unknown

    @classmethod
    def from_code(cls, index: int, prediction: int, code: int, entropies, label=None) -> "Decision":
        """From a batch tensor's ``decided_at`` code (exit index >= 0, ``CLOUD`` or ``FALLBACK``)."""
        route = Route.CLOUD if code == CLOUD else Route.FALLBACK if code == FALLBACK else Route.EXIT
        return cls(index, prediction, route, code if route is Route.EXIT else None, tuple(entropies), label)

    @property
    def decided_at(self) -> str:
        return f"exit:{self.exit}" if self.route is Route.EXIT else self.route.value

    def to_json(self, classes: list[str] | None = None) -> dict:
        d = {"index": self.index, "label": -1 if self.label is None else self.label, "prediction": self.prediction,
             "decided_at": self.decided_at, "entropies": [round(e, 6) for e in self.entropies]}
        if classes:
            d["prediction_name"] = classes[self.prediction] if 0 <= self.prediction < len(classes) else None
            d["label_name"] = classes[self.label] if self.label is not None and 0 <= self.label < len(classes) else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Decision":
        where = d["decided_at"]
        if where.startswith("exit:"):
            route, k = Route.EXIT, int(where[5:])
        else:
            route, k = Route(where), None
        label = d.get("label")
        return cls(int(d["index"]), int(d["prediction"]), route, k, tuple(d.get("entropies", ())),
                   None if label is None or label < 0 else int(label))


def decisions_from(batch, labels, start: int) -> list[Decision]:
    """Typed decisions of a batch (``hybrid.Decisions``: predictions, decided_at codes, entropies)."""
    preds, codes, ents = batch.predictions.tolist(), batch.decided_at.tolist(), batch.entropies.tolist()
    out = []
    for i, lab in enumerate(labels.tolist()):
        e = [v for v in ents[i] if not math.isnan(v)]
        out.append(Decision.from_code(start + i, preds[i], codes[i], e, None if lab < 0 else lab))
    return out


def summarize(decisions: list[Decision], report: EnergyReport, thresholds, cloud_accuracy: float | None = None) -> dict:
    """The summary of ``hybridexit evaluate --json``; the edge runtime adds its own keys to it.

    Fractions and accuracies are numbers in [0, 1]. ``expected_uj`` and ``reduction`` use the measured exit
    fractions. Inputs that fell back (cloud unreachable) paid the edge only, but they are not savings: the
    summary counts them apart (``fallback_fraction``) and ``reduction`` is reported over the inputs that were
    answered as designed (exit or cloud) only, ``None`` when there are none.
    """
    n = len(decisions)
    k = len(report.config.exits)
    counts = [0] * k
    fallback = sum(d.route is Route.FALLBACK for d in decisions)
    for d in decisions:
        if d.route is Route.EXIT:
            counts[d.exit] += 1
    fr = [c / n if n else 0.0 for c in counts]
    served = n - fallback  # inputs answered as designed
    served_fr = [c / served for c in counts] if served else [0.0] * k
    exp = report.expected_uj(served_fr) if served else None
    labelled = [d for d in decisions if d.label is not None]
    return {
        "n": n,
        "accuracy": sum(d.prediction == d.label for d in labelled) / len(labelled) if labelled else None,
        "exit_fraction": fr,
        "edge_fraction": sum(fr),
        "cloud_fraction": sum(d.route is Route.CLOUD for d in decisions) / n if n else 0.0,
        "fallback_fraction": fallback / n if n else 0.0,
        "cloud_accuracy": cloud_accuracy,
        "thresholds": list(thresholds),
        "fp32_uj": report.fp32_uj,
        "edge_uj": report.edge_uj,
        "cloud_uj": report.cloud_uj,
        "expected_uj": exp,
        "reduction": report.fp32_uj / exp if exp else None,
    }


def unreadable_record(index: int, label: int, error: str, classes: list[str] | None = None) -> dict:
    """The record of an input that could not be read: no prediction, the reason in ``error``."""
    rec = {"index": index, "label": label, "prediction": None, "decided_at": "unreadable", "entropies": []}
    if classes:
        rec["prediction_name"] = None
        rec["label_name"] = classes[label] if 0 <= label < len(classes) else None
    return {**rec, "latency_ms": 0.0, "payload_bytes": 0, "error": error}
