"""The one conditional evaluation: ``evaluate_conditional`` splits the checkpoint's network into EdgeNet / CloudNet
and runs Algorithm 1 batch by batch on the chosen engine (the cloud half sees only the samples that did not exit);
with a codec, the offloaded features go through real wire frames and the receiver's decoding before the cloud half
(``evaluate_codec``). Every exit's statistics for calibration are ``calibration.stats``.
Images are raw (uint8): the network normalizes them itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..calibration.stats import collect_exit_stats, progress_batches
from ..codecs import QUANT_NAMES, Codec, get, held_codecs
from ..codecs.links import raw_image_bytes
from ..data import Split
from ..engines import get_engine
from ..errors import ConfigError
from ..model.checkpoint import fingerprint as model_fingerprint
from ..model.energy import energy_report
from ..model.hybrid import conditional_inference, resolve_thresholds
from ..model.records import Decision, decisions_from, summarize
from ..runtime import wire


@torch.no_grad()
def evaluate_conditional(model, split: Split, thresholds, temperatures=None, batch_size: int = 500,
                         device=None, progress: bool = False, engine: str = "torch") -> list[Decision]:
    """Typed per-image decisions of a real conditional run (edge half on ``engine``, exits, then the torch cloud
    half on what is left)."""
    device = device or next(model.parameters()).device
    edge, cloud = model.split()
    edge, cloud = get_engine(engine, edge.eval().to(device)), cloud.eval().to(device)
    out: list[Decision] = []
    for images, labels in progress_batches(split, batch_size, "evaluate", progress):
        d = conditional_inference(edge, cloud, images.to(device), thresholds, temperatures)
        out.extend(decisions_from(d, labels, len(out)))
    return out


@torch.no_grad()
def evaluate_outputs(model, split: Split, batch_size=500, device=None) -> list[float]:
    """Accuracy of every output (exits then final) over a split, running the whole network (no exiting)."""
    stats = collect_exit_stats(model, split, batch_size, device)
    return [stats.accuracy(stats.exit_preds[:, j]) for j in range(stats.exit_logits.shape[1])] + [stats.cloud_accuracy]


def evaluate_checkpoint_summary(model, split: Split, thresholds, temperatures=None, batch_size=500, device=None,
                                progress=False, engine: str = "torch") -> tuple[dict, list[Decision]]:
    """Conditional run + the accuracy of the final classifier alone (``cloud_accuracy``), summarized."""
    thresholds = resolve_thresholds(model.cfg, thresholds)
    decisions = evaluate_conditional(model, split, thresholds, temperatures, batch_size, device, progress, engine)
    stats = collect_exit_stats(model, split, batch_size, device, progress)
    return summarize(decisions, energy_report(model.cfg), thresholds, stats.cloud_accuracy), decisions


# ---------------------------------------------------------------------------------------------- with a codec
@dataclass
class EdgePass:
    """The edge half's decisions on a split, and the features of the samples it offloads (computed once)."""

    predictions: torch.Tensor  # (N,) the last exit's answer
    decided_at: torch.Tensor  # (N,)
    remaining: torch.Tensor  # (R,) indices of the offloaded samples
    features: torch.Tensor  # (R, C, H, W)
    labels: torch.Tensor  # (N,)


@torch.no_grad()
def edge_pass(model, split, thresholds, temperatures=None, batch_size: int = 500, engine: str = "torch") -> EdgePass:
    edge, _ = model.split()
    edge = get_engine(engine, edge.eval())  # the engine the run's own decisions came from (evaluate --engine)
    preds, decided, rem, feats = [], [], [], []
    for i in range(0, len(split), batch_size):
        r = edge.decide(split.images[i:i + batch_size], thresholds, temperatures)
        preds.append(r.predictions)
        decided.append(r.decided_at)
        rem.append(r.remaining + i)
        feats.append(r.features.contiguous())
    return EdgePass(torch.cat(preds), torch.cat(decided), torch.cat(rem), torch.cat(feats), split.labels.clone())


@torch.no_grad()
def apply_codec(model, ep: EdgePass, codec: Codec, checkpoint) -> dict:
    """The cloud's answers for the offloaded samples of ``ep`` after their features went through ``codec`` as
    one-sample wire frames, decoded by the receiver's side (its own copy of a learned codec, from ``checkpoint``).

    Returns accuracy, edge fraction, bytes per offloaded sample (whole frames) and per input, encode / decode
    time per offloaded sample (wall, and this thread's CPU time), the codec's MACs, and per-sample ``predictions``
    and ``payload_bytes``."""
    fp = model_fingerprint(checkpoint)
    held = held_codecs(checkpoint)
    _, cloud = model.split()
    cloud.eval()
    shape = tuple(ep.features.shape[1:])
    n, off = len(ep.labels), len(ep.remaining)
    sizes = torch.zeros(n, dtype=torch.long)
    back = []
    t_enc = t_dec = c_enc = c_dec = 0.0
    for j in range(off):
        c0, t0 = time.thread_time(), time.perf_counter()
        body = wire.frame(codec, ep.features[j:j + 1], fp)
        t1, c1 = time.perf_counter(), time.thread_time()
        back.append(wire.decode(body, fp, (1, *shape), codecs=held))
        t_dec += time.perf_counter() - t1
        c_dec += time.thread_time() - c1
        t_enc += t1 - t0
        c_enc += c1 - c0
        sizes[ep.remaining[j]] = len(body)
    preds = ep.predictions.clone()
    if off:
        x = torch.cat(back)
        preds[ep.remaining] = torch.cat([cloud(x[i:i + 500]).argmax(1) for i in range(0, off, 500)])
    return {"n": n, "accuracy": int((preds == ep.labels).sum()) / n, "edge_fraction": 1 - off / n,
            "payload_bytes_per_offloaded": int(sizes.sum()) / off if off else None,
            "payload_bytes_per_input": int(sizes.sum()) / n,
            "encode_ms_per_sample": 1000 * t_enc / max(off, 1), "decode_ms_per_sample": 1000 * t_dec / max(off, 1),
            "encode_cpu_ms_per_sample": 1000 * c_enc / max(off, 1), "decode_cpu_ms_per_sample": 1000 * c_dec / max(off, 1),
            "codec_edge_macs": codec.edge_macs(shape), "codec_cloud_macs": codec.cloud_macs(shape),
            "predictions": preds, "payload_bytes": sizes}


def calibration_features(model, val_split, thresholds, temperatures=None) -> torch.Tensor:
    """What a q codec chooses its clip ranges on: the edge features of the validation samples it would offload."""
    return edge_pass(model, val_split, thresholds, temperatures).features


def codec_summary(model, split, thresholds, temperatures, name: str, checkpoint, val_split=None,
                  engine: str = "torch") -> dict:
    """``hybridexit evaluate --codec NAME``: the conditional run with the codec applied to the offloaded features.
    Keys: codec, accuracy (with the codec), payload bytes per offloaded sample / per input, raw image bytes,
    encode / decode ms per sample, the codec's MACs; ``predictions`` and ``payload_bytes`` per sample."""
    calib = None
    if name in QUANT_NAMES:
        if val_split is None:
            raise ConfigError(f"codec {name} chooses its clip ranges on the validation split: it is needed")
        calib = calibration_features(model, val_split, thresholds, temperatures)
    r = evaluate_codec(model, split, thresholds, get(name, checkpoint=checkpoint, calibration=calib), checkpoint,
                       temperatures, engine=engine)
    return {"codec": name, "raw_image_bytes": raw_image_bytes(model.cfg), **{k: v for k, v in r.items() if k != "decided_at"}}


def evaluate_codec(model, split, thresholds, codec: Codec, checkpoint, temperatures=None, batch_size: int = 500,
                   engine: str = "torch") -> dict:
    """Conditional run of ``model`` on ``split`` with the offloaded features sent through ``codec``, the edge on
    ``engine``."""
    ep = edge_pass(model, split, thresholds, temperatures, batch_size, engine)
    return {**apply_codec(model, ep, codec, checkpoint), "decided_at": ep.decided_at}
