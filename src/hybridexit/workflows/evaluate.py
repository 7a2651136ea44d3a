"""The one evaluation loop, ``evaluate_split``: per batch, the edge half decides on the chosen engine (Algorithm 1:
exits, then the features of the samples that did not exit), the offloaded features go to the cloud half as they
are and/or through codecs as real wire frames (``wire.frame``, then ``wire.decode`` with the receiver's held
codecs, one frame per sample as a batch-size-1 edge sends them, encode and decode timed), and the cloud half
answers. Every figure of a run comes from that one pass:

- ``accuracy``: the answers as deployed (exit answers, the cloud's for the rest; with a codec, after it);
- ``offloaded_accuracy``: the cloud's accuracy on the samples it received (those no exit decided), the same answers;
- ``cloud_accuracy``: the final classifier on every sample, the network without its exits (the paper's "final
  classifier" column): the cloud's answers on the offloaded samples, completed in the same batch by the edge run to
  its end (``edge.forward`` on the same engine) and the cloud half for the samples that exited. Without a codec (or
  with one the cloud half does not need, on the features as they are); None behind a learned codec whose cloud half
  reads only the codec's output. It is the accuracy ``calibrate`` compares with, there on the validation split
  (``calibration.stats``).

``evaluate_conditional`` (typed decisions), ``evaluate_checkpoint_summary`` / ``evaluate_run`` (the summary of
``hybridexit evaluate``, with a codec or not) and ``evaluate_codec`` (one codec's figures) are views of that loop.
``evaluate_outputs`` is training's validation figure, every output of the whole network (``calibration.stats``).
Images are raw (uint8): the network normalizes them itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration.stats import collect_exit_stats, progress_batches
from ..codecs import QUANT_NAMES, Codec, get, held_codecs, required_codec
from ..codecs.links import raw_image_bytes
from ..data import Split
from ..engines import get_engine
from ..errors import ConfigError
from ..model.checkpoint import fingerprint as model_fingerprint
from ..model.energy import energy_report
from ..model.hybrid import CLOUD, Decisions, resolve_thresholds
from ..model.records import Decision, decisions_from, summarize
from ..runtime import wire


@dataclass
class WireCodec:
    """A codec as a run sends with it: frames encoded by ``codec`` for the model of ``checkpoint`` (its fingerprint),
    decoded by that checkpoint's receiver (its held codecs: the learned one when the checkpoint carries one)."""

    codec: Codec
    checkpoint: str | Path

    def __post_init__(self):
        self.fingerprint = model_fingerprint(self.checkpoint)
        self.held = held_codecs(self.checkpoint)


@dataclass
class CodecTally:
    """One codec's answers and costs over a run: per-sample predictions (exit answers, the cloud's after the codec
    for the offloaded samples) and whole-frame bytes (0 for samples that exited), encode / decode time (wall, and
    this thread's CPU time) summed over the offloaded samples."""

    wire_codec: WireCodec
    predictions: torch.Tensor
    payload_bytes: torch.Tensor
    times: dict = field(default_factory=lambda: {"encode": 0.0, "decode": 0.0, "encode_cpu": 0.0, "decode_cpu": 0.0})

    def send(self, cloud, feats: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """The cloud's answers on ``feats`` (the offloaded samples of a batch, at split positions ``where``) after
        each went through the codec as its own wire frame."""
        w, shape, back = self.wire_codec, (1, *feats.shape[1:]), []
        for j in range(len(feats)):
            c0, t0 = time.thread_time(), time.perf_counter()
            body = wire.frame(w.codec, feats[j:j + 1], w.fingerprint)
            t1, c1 = time.perf_counter(), time.thread_time()
            back.append(wire.decode(body, w.fingerprint, shape, codecs=w.held))
            self.times["decode"] += time.perf_counter() - t1
            self.times["decode_cpu"] += time.thread_time() - c1
            self.times["encode"] += t1 - t0
            self.times["encode_cpu"] += c1 - c0
            self.payload_bytes[where[j]] = len(body)
        return cloud(torch.cat(back).to(next(cloud.parameters()).device)).argmax(1).cpu()


@dataclass
class SplitRun:
    """What one pass of ``evaluate_split`` over a split gives; per-sample tensors are in split order (N samples,
    R of them offloaded)."""

    labels: torch.Tensor  # (N,) -1 where unknown
    decided_at: torch.Tensor  # (N,) exit index or CLOUD
    entropies: torch.Tensor  # (N, K), NaN where not reached
    edge_predictions: torch.Tensor  # (N,) the last exit's answer each sample reached
    remaining: torch.Tensor  # (R,) the offloaded samples' positions
    feature_shape: tuple
    plain: torch.Tensor | None  # (N,) answers with the features sent as they are (None: not run)
    final: torch.Tensor | None  # (N,) the final classifier on every sample (None: not run)
    features: torch.Tensor | None  # (R, C, H, W) the offloaded features (kept on request)
    coded: dict[str, CodecTally]  # per codec

    @property
    def n(self) -> int:
        return len(self.labels)

    def predictions(self, codec: str | None = None) -> torch.Tensor:
        return self.plain if codec is None else self.coded[codec].predictions

    def decisions(self, codec: str | None = None) -> list[Decision]:
        """Typed per-input decisions, the cloud's answers those of ``codec`` (None: the features as they are)."""
        return decisions_from(Decisions(self.predictions(codec), self.decided_at, self.entropies), self.labels, 0)

    def _accuracy(self, preds: torch.Tensor | None, where: torch.Tensor | None = None) -> float | None:
        labels = self.labels if where is None else self.labels[where]
        if preds is None or not len(labels) or bool((labels < 0).any()):
            return None
        return int(((preds if where is None else preds[where]) == labels).sum()) / len(labels)

    def accuracy(self, codec: str | None = None) -> float | None:
        return self._accuracy(self.predictions(codec))

    def offloaded_accuracy(self, codec: str | None = None) -> float | None:
        """The cloud's accuracy on the samples it received (None when none was offloaded or labels are unknown)."""
        return self._accuracy(self.predictions(codec), self.remaining)

    @property
    def cloud_accuracy(self) -> float | None:
        """The final classifier's accuracy on every sample (the network without exits); None when not run."""
        return self._accuracy(self.final)

    def codec_figures(self, codec: str) -> dict:
        """Accuracy, edge fraction, bytes per offloaded sample (whole frames) and per input, encode / decode time per
        offloaded sample (wall, and this thread's CPU time), the codec's MACs, per-sample ``predictions`` and
        ``payload_bytes``."""
        t, n, off = self.coded[codec], self.n, len(self.remaining)
        per = {k: 1000 * v / max(off, 1) for k, v in t.times.items()}
        total = int(t.payload_bytes.sum())
        return {"n": n, "accuracy": self.accuracy(codec), "edge_fraction": 1 - off / n,
                "offloaded_accuracy": self.offloaded_accuracy(codec),
                "payload_bytes_per_offloaded": total / off if off else None, "payload_bytes_per_input": total / n,
                "encode_ms_per_sample": per["encode"], "decode_ms_per_sample": per["decode"],
                "encode_cpu_ms_per_sample": per["encode_cpu"], "decode_cpu_ms_per_sample": per["decode_cpu"],
                "codec_edge_macs": t.wire_codec.codec.edge_macs(self.feature_shape),
                "codec_cloud_macs": t.wire_codec.codec.cloud_macs(self.feature_shape),
                "predictions": t.predictions, "payload_bytes": t.payload_bytes}


@torch.no_grad()
def evaluate_split(model, split: Split, thresholds, temperatures=None, *, codecs: dict[str, WireCodec] | None = None,
                   plain: bool = True, full_network: bool = False, keep_features: bool = False,
                   batch_size: int = 500, device=None, progress: bool = False, engine: str = "torch") -> SplitRun:
    """The one pass: per batch the edge half (on ``engine``) decides, then the cloud half answers the offloaded
    samples on their features as they are (``plain``) and through each of ``codecs`` (name -> ``WireCodec``);
    ``full_network`` also runs the samples that exited to the end (the final classifier on every sample; needs
    ``plain``); ``keep_features`` keeps the offloaded features."""
    codecs = codecs or {}
    if full_network and not plain:
        raise ConfigError("the final classifier on every sample is the network without a codec: it needs plain=True")
    device = device or next(model.parameters()).device
    edge, cloud = model.split()
    edge, cloud = get_engine(engine, edge.eval().to(device)), cloud.eval().to(device)
    n = len(split)
    decided, ents, edge_preds = [], [], []
    remaining, feats_kept = [], []
    out_plain = torch.full((n,), -1, dtype=torch.long) if plain else None
    out_final = torch.full((n,), -1, dtype=torch.long) if full_network else None
    tallies = {name: CodecTally(w, torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.long))
               for name, w in codecs.items()}
    start = 0
    for images, _ in progress_batches(split, batch_size, "evaluate", progress):
        x = images.to(device)
        r = edge.decide(x, thresholds, temperatures)
        b = len(images)
        rows = slice(start, start + b)
        preds = r.predictions.cpu()
        rem = r.remaining.cpu()
        where = rem + start
        feats = r.features  # as the engine gives them (packed: a channels-last view), as the cloud gets them deployed
        decided.append(r.decided_at.cpu())
        ents.append(r.entropies.cpu())
        edge_preds.append(preds)
        remaining.append(where)
        if keep_features:
            feats_kept.append(feats.contiguous().cpu())
        for answers in ([out_plain] if plain else []) + [t.predictions for t in tallies.values()]:
            answers[rows] = preds
        if len(rem):
            if plain:
                out_plain[where] = cloud(feats).argmax(1).cpu()
            for t in tallies.values():
                t.predictions[where] = t.send(cloud, feats.contiguous().cpu(), where)
        if full_network:
            out_final[rows] = out_plain[rows]
            exited = (r.decided_at != CLOUD).nonzero().flatten()
            if len(exited):
                out_final[exited.cpu() + start] = cloud(edge.forward(x[exited])).argmax(1).cpu()
        start += b
    k = len(model.cfg.exits)
    cat = (lambda parts, empty: torch.cat(parts) if parts else empty)
    shape = tuple(edge.feature_shape)
    return SplitRun(split.labels.clone(), cat(decided, torch.zeros(0, dtype=torch.long)),
                    cat(ents, torch.zeros(0, k)), cat(edge_preds, torch.zeros(0, dtype=torch.long)),
                    cat(remaining, torch.zeros(0, dtype=torch.long)), shape, out_plain, out_final,
                    cat(feats_kept, torch.zeros(0, *shape)) if keep_features else None, tallies)


def evaluate_conditional(model, split: Split, thresholds, temperatures=None, batch_size: int = 500,
                         device=None, progress: bool = False, engine: str = "torch") -> list[Decision]:
    """Typed per-image decisions of a real conditional run (edge half on ``engine``, exits, then the torch cloud
    half on what is left)."""
    return evaluate_split(model, split, thresholds, temperatures, batch_size=batch_size, device=device,
                          progress=progress, engine=engine).decisions()


@torch.no_grad()
def evaluate_outputs(model, split: Split, batch_size=500, device=None) -> list[float]:
    """Accuracy of every output (exits then final) over a split, running the whole network (no exiting)."""
    stats = collect_exit_stats(model, split, batch_size, device)
    return [stats.accuracy(stats.exit_preds[:, j]) for j in range(stats.exit_logits.shape[1])] + [stats.cloud_accuracy]


@dataclass
class Evaluation:
    """``hybridexit evaluate``'s run: its summary, its decisions, and (with a codec) its figures."""

    summary: dict
    decisions: list[Decision]
    coded: dict | None  # codec_figures of the run's codec (per-sample ``predictions`` and ``payload_bytes``)


def wire_codec(model, name: str, checkpoint, val_split: Split | None, thresholds, temperatures=None) -> WireCodec:
    """The codec ``name`` as ``evaluate --codec`` sends with it; a q codec chooses its clip ranges on the features
    the edge would offload from ``val_split`` (a pass of its own, over that split)."""
    calib = None
    if name in QUANT_NAMES:
        if val_split is None:
            raise ConfigError(f"codec {name} chooses its clip ranges on the validation split: it is needed")
        calib = offloaded_features(model, val_split, thresholds, temperatures)
    return WireCodec(get(name, checkpoint=checkpoint, calibration=calib), checkpoint)


def evaluate_run(model, split: Split, thresholds, temperatures=None, batch_size=500, device=None, progress=False,
                 engine: str = "torch", codec: str | None = None, checkpoint=None,
                 val_split: Split | None = None) -> Evaluation:
    """One pass (``evaluate_split``) summarized: ``summarize``'s keys with ``cloud_accuracy`` (the final classifier on
    every sample) and ``offloaded_accuracy`` (the cloud's answers on the samples it received). With ``codec`` (the
    codec of ``checkpoint``'s receiver; a q codec needs ``val_split``) the run's answers are the codec's, and the
    summary adds its figures (bytes, times, MACs), ``raw_image_bytes`` and ``accuracy_without_codec`` (the same pass,
    features as they are; None, like ``cloud_accuracy``, when the checkpoint's cloud half reads only its codec)."""
    thresholds = resolve_thresholds(model.cfg, thresholds)
    labelled = not bool((split.labels < 0).any())
    behind = codec is not None and required_codec(checkpoint) == codec  # the cloud half reads only this codec
    codecs = {codec: wire_codec(model, codec, checkpoint, val_split, thresholds, temperatures)} if codec else {}
    run = evaluate_split(model, split, thresholds, temperatures, codecs=codecs, plain=not behind,
                         full_network=labelled and not behind, batch_size=batch_size, device=device,
                         progress=progress, engine=engine)
    decisions = run.decisions(codec)
    summary = summarize(decisions, energy_report(model.cfg), thresholds, run.cloud_accuracy)
    summary["offloaded_accuracy"] = run.offloaded_accuracy(codec)
    coded = None
    if codec:
        coded = run.codec_figures(codec)
        summary.update({"accuracy_without_codec": None if behind else run.accuracy(), "codec": codec,
                        "raw_image_bytes": raw_image_bytes(model.cfg),
                        **{k: v for k, v in coded.items() if k not in ("accuracy", "predictions", "payload_bytes")}})
    return Evaluation(summary, decisions, coded)


def evaluate_checkpoint_summary(model, split: Split, thresholds, temperatures=None, batch_size=500, device=None,
                                progress=False, engine: str = "torch") -> tuple[dict, list[Decision]]:
    """``evaluate_run`` without a codec: (summary, decisions)."""
    ev = evaluate_run(model, split, thresholds, temperatures, batch_size, device, progress, engine)
    return ev.summary, ev.decisions


def offloaded_features(model, split: Split, thresholds, temperatures=None, engine: str = "torch") -> torch.Tensor:
    """The edge features of the samples of ``split`` the edge offloads (no cloud half run): on the validation split,
    what a q codec chooses its clip ranges on."""
    return evaluate_split(model, split, thresholds, temperatures, plain=False, keep_features=True,
                          engine=engine).features


def evaluate_codec(model, split, thresholds, codec: Codec, checkpoint, temperatures=None, batch_size: int = 500,
                   engine: str = "torch") -> dict:
    """``codec``'s figures (``SplitRun.codec_figures``) on a conditional run of ``model`` on ``split``, the edge on
    ``engine``, frames decoded by ``checkpoint``'s receiver; ``decided_at`` per sample."""
    run = evaluate_split(model, split, thresholds, temperatures, codecs={"codec": WireCodec(codec, checkpoint)},
                         plain=False, batch_size=batch_size, engine=engine)
    return {**run.codec_figures("codec"), "decided_at": run.decided_at}
