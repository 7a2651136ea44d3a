"""Does an edge engine decide as the torch engine on a checkpoint's split? -> results/engine_agreement.json.

    python benchmarks/engine_agreement.py --checkpoint CKPT [--engine onnx] [--data-dir data] [--split test]

Runs the library call behind ``hybridexit evaluate CKPT --split S --engine E`` (``evaluate.evaluate_conditional``,
the checkpoint's exit policy) for the torch engine and for ``--engine``, one thread, and counts the images with the
same decision (exit or cloud) and the same prediction. Each disagreement is traced (onnx engine): the torch edge
and the ONNX graph (``onnx_export.edge_model(trace=True)``) run side by side on the evaluation batch that held the
image, each on its own activations, and every quantizer input whose level differs is listed with both values and
its distance to the nearest quantizer boundary (binary: 0; k-bit: the rounding points of (z + 1) Z / 2); the exit
entropies are given against the threshold. A level that flips because of float rounding has the two inputs a few
float32 steps apart (more after many layers) on either side of a boundary. For context the same trace runs on the
first ``--trace-images`` images: how many levels differ per image (on images that agree too) and, for binary convs,
how many QLinearConv sums saturate. One row per checkpoint and engine; a run replaces its own row.
``--torch-batch-check B`` runs the torch engine at batch size B too (the reference's own reproducibility),
``--fp64-check`` runs it in float64.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridexit.data import load_cifar
from hybridexit.model.checkpoint import load_model, split_of
from hybridexit.model.exits import entropy
from hybridexit.workflows.evaluate import evaluate_conditional

# the two engines' inputs to a quantizer (O(1) values) differing by less than this across a level boundary: a flip
# by float rounding (of that layer, or accumulated over the layers before it)
ROUNDING = 1e-4


def quantizers(edge) -> list:
    """Every quantized conv (``QuanConv``) of the edge, in network order (the graph's ``quantizer_in_<k>``)."""
    return [q for block in edge.blocks for q in (block.c1, block.c2) if q.bits != 32]


def levels(z: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 1:
        return z >= 0
    zz = 2**bits - 1
    return torch.round((z.clamp(-1.0, 1.0) + 1.0) * (zz / 2.0))


def boundary_distance(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Distance of z to the nearest value where its level changes (inf outside the quantizer's range)."""
    if bits == 1:
        return z.abs()
    zz = 2**bits - 1
    u = (z.double() + 1.0) * (zz / 2.0)
    d = (u - u.floor() - 0.5).abs() * (2.0 / zz)
    return torch.where(z.abs() < 1 + 1.0 / zz, d, torch.full_like(d, math.inf)).float()


def binary_saturation(z: torch.Tensor, q) -> int:
    """QLinearConv sums of a binary conv outside [-256, 254] (scale-2 requantization, ``onnx_export``)."""
    w = q.conv.weight.detach()
    if 9 * w.shape[1] <= 127:
        return 0
    s = F.conv2d(torch.where(z >= 0, 1.0, -1.0).double(), torch.where(w >= 0, 1.0, -1.0).double(),
                 stride=q.conv.stride, padding=1)
    return int(((s > 254) | (s < -256)).sum())


def quantizer_input(q, x: torch.Tensor) -> torch.Tensor:
    """The input of quantized conv q's activation quantizer, from the conv's input x: BatchNorm, then RSign."""
    z = q.bn(x)
    return z if q.shift is None else q.shift(z)


class Tracer:
    """The torch edge and the traced ONNX graph side by side on a batch of raw images."""

    def __init__(self, edge):
        from hybridexit.engines.onnx_engine import OnnxEdge
        from hybridexit.engines.onnx_export import edge_model

        self.edge, self.qs = edge, quantizers(edge)
        self.graph = OnnxEdge(edge.cfg, edge_model(edge, trace=True).SerializeToString())

    @torch.no_grad()
    def run(self, x: torch.Tensor, rows=None):
        """(torch quantizer inputs, torch exit logits, torch features, onnx outputs) for the batch of images x,
        each computed on the whole batch as the engines compute it; torch's quantizer inputs kept for ``rows``."""
        zs, logits = [], []
        keep = slice(None) if rows is None else list(rows)
        hooks = [q.register_forward_pre_hook(lambda m, inp: zs.append(quantizer_input(m, inp[0])[keep].clone()))
                 for q in self.qs]
        try:
            h = self.edge.walk(x, lambda j, head, f: logits.append(head(f)))
        finally:
            for hk in hooks:
                hk.remove()
        return zs, logits, h, self.graph.run(x)

    def flips(self, zs, out, i: int, k_row: int | None = None) -> tuple[list[dict], int]:
        """Image i of the batch (row ``k_row`` of the kept torch inputs, default i): every quantizer level that
        differs (conv k, position, both inputs, torch's input's distance to a boundary) and the binary
        QLinearConv sums that saturate."""
        found, sat, kr = [], 0, i if k_row is None else k_row
        for k, (q, zt) in enumerate(zip(self.qs, zs)):
            zo = out[f"quantizer_in_{k}"][i : i + 1]
            zt = zt[kr : kr + 1]
            if q.bits == 1:
                sat += binary_saturation(zo, q)
            diff = (levels(zt, q.bits) != levels(zo, q.bits)).nonzero().tolist()
            dist = boundary_distance(zt, q.bits)
            found += [{"conv": k, "position": p[1:], "z_torch": float(zt[tuple(p)]), "z_onnx": float(zo[tuple(p)]),
                       "boundary_distance": float(dist[tuple(p)])} for p in diff]
        return found, sat


def margin(logits: torch.Tensor) -> float:
    return float(logits.topk(2).values.diff().abs()[0])


@torch.no_grad()
def cause(tr: Tracer, cloud, run, i: int, k_row: int, thresholds, temperatures) -> dict:
    """Why image i of a traced batch (``Tracer.run``) got another decision or prediction on the onnx engine."""
    zs, logits, h, out = run
    flips, sat = tr.flips(zs, out, i, k_row)
    temps = temperatures or (1.0,) * len(thresholds)
    exits = []
    for j, lt in enumerate(logits):
        lt, lo = lt[i : i + 1], out[f"logits_{j}"][i : i + 1]
        exits.append({"exit": j, "threshold": thresholds[j],
                      "entropy_torch": float(entropy(lt.float() / temps[j])[0]),
                      "entropy_onnx": float(entropy(lo.float() / temps[j])[0]),
                      "top2_margin_torch": margin(lt[0]), "prediction_torch": int(lt.argmax()),
                      "prediction_onnx": int(lo.argmax())})
    ct, co = cloud(h[i : i + 1]), cloud(out["features"][i : i + 1])  # the cloud on each engine's features, batch 1
    cl = {"cloud_prediction_torch": int(ct.argmax()), "cloud_prediction_onnx": int(co.argmax()),
          "cloud_top2_margin_torch": margin(ct[0])}
    first = [f for f in flips if f["conv"] == flips[0]["conv"]] if flips else []
    if sat:
        text = f"{sat} saturated QLinearConv sums"
    elif not flips:
        text = ("no quantizer level differs: float rounding of the float parts (edge features, and the cloud half "
                f"on them; torch's cloud top-2 margin {cl['cloud_top2_margin_torch']:.1e})")
    elif all(abs(f["z_torch"] - f["z_onnx"]) < ROUNDING for f in first):
        d = max(f["boundary_distance"] for f in first)
        text = (f"quantizer level flipped by float rounding at conv {first[0]['conv']} (input within {d:.1e} of a "
                f"boundary), {len(flips)} levels differ in all")
    else:
        text = "other: a level differs with its input away from every boundary"
    near = [e for e in exits if min(abs(e["entropy_torch"] - e["threshold"]), abs(e["entropy_onnx"] - e["threshold"])) < 0.05]
    if near:
        text += "; exit entropy near its threshold: " + ", ".join(
            f"exit {e['exit']} torch {e['entropy_torch']:.4f} / onnx {e['entropy_onnx']:.4f} vs {e['threshold']:.4f}"
            for e in near)
    return {"cause": text, "levels_differing": len(flips), "first_flips": first[:3], "saturated_sums": sat,
            "exits": exits, **cl}


def traced_causes(tr: Tracer, cloud, images, bad: list[int], batch_size: int, thresholds, temperatures) -> dict:
    """``cause`` of every disagreeing image, each traced in the evaluation batch it was run in."""
    found = {}
    for b in sorted({i // batch_size for i in bad}):
        rows = [i - b * batch_size for i in bad if i // batch_size == b]
        run = tr.run(images[b * batch_size : (b + 1) * batch_size], rows)
        for k, r in enumerate(rows):
            found[b * batch_size + r] = cause(tr, cloud, run, r, k, thresholds, temperatures)
    return found


def context(tr: Tracer, images: torch.Tensor, batch: int) -> dict:
    """Over these images: how many quantizer levels differ between torch and onnx, and saturated binary sums."""
    per_image, sat_images, sat = [], 0, 0
    for b in range(0, len(images), batch):
        x = images[b : b + batch]
        zs, _, _, out = tr.run(x)
        for i in range(len(x)):
            f, s = tr.flips(zs, out, i)
            per_image.append(len(f))
            sat, sat_images = sat + s, sat_images + (s > 0)
    n = len(per_image)
    elements = sum(z.numel() // z.shape[0] for z in tr.run(images[:1])[0])
    return {"images": n, "quantizer_inputs_per_image": elements,
            "images_with_a_level_differing": sum(c > 0 for c in per_image),
            "levels_differing_per_image_mean": sum(per_image) / max(n, 1),
            "images_with_saturated_sums": sat_images, "saturated_sums": sat}


def float64_decisions(model, split, thresholds, temperatures, batch_size: int) -> list:
    """Decisions of the torch engine with the whole network in float64 (after ``Normalize``'s float32 x / 255)."""
    import copy

    from hybridexit.data import batches
    from hybridexit.model.hybrid import conditional_inference
    from hybridexit.model.records import decisions_from

    edge, cloud = (copy.deepcopy(m).double().eval() for m in model.split())
    out = []
    for images, labels in batches(split, batch_size):
        x = images.float().div_(255.0).double()  # Normalize takes floats in [0, 1] as they are (float32 first)
        out.extend(decisions_from(conditional_inference(edge, cloud, x, thresholds, temperatures), labels, len(out)))
    return out


def untraced_cause(t, e, t64, thresholds) -> str:
    """An engine without a trace (packed): which of float32 torch and the engine float64 torch agrees with, and
    the exit entropies of both against the threshold: where float64 torch decides as the engine, torch's own float32
    rounding made the difference."""
    side = ("float64 torch decides as the engine" if (t64.decided_at, t64.prediction) == (e.decided_at, e.prediction)
            else "float64 torch decides as float32 torch" if (t64.decided_at, t64.prediction) == (t.decided_at,
                                                                                             t.prediction)
            else "float64 torch decides as neither")
    ents = "; ".join(f"exit {j}: torch {a:.4f} / engine {b:.4f} vs threshold {thr:.4f}"
                     for j, (a, b, thr) in enumerate(zip(t.entropies, e.entropies, thresholds)))
    return f"{side} (quantizer levels flipped by float rounding propagate); {ents}"


def update_rows(path: Path, row: dict) -> None:
    key = ("checkpoint", "engine", "split")
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in rows if tuple(r.get(k) for k in key) != tuple(row.get(k) for k in key)]
    rows = sorted(rows + [row], key=lambda r: tuple(str(r.get(k)) for k in key))
    path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--engine", default="onnx", choices=("onnx", "packed"))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--trace-images", type=int, default=500, help="context: trace the first N images (onnx)")
    p.add_argument("--torch-batch-check", type=int, default=None, metavar="B",
                   help="also run the torch engine at batch size B and count how often it agrees with itself at "
                        "--batch-size (the reference's own reproducibility)")
    p.add_argument("--fp64-check", action="store_true",
                   help="also run the torch engine in float64 (edge and cloud; the same float32 input scaling) and "
                        "count how often float32 torch and the engine decide as it does")
    p.add_argument("--out", default="results/engine_agreement.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, meta = load_model(a.checkpoint)
    policy = meta["policy"]
    thresholds, temperatures = list(policy.thresholds), (list(policy.temperatures) if policy.temperatures else None)
    split = split_of(a.checkpoint, load_cifar(meta["data"]["name"], a.data_dir), a.split).limit(a.limit)
    runs = {"torch": evaluate_conditional(model, split, thresholds, temperatures, a.batch_size, progress=True)}
    runs[a.engine] = evaluate_conditional(model, split, thresholds, temperatures, a.batch_size, engine=a.engine)
    ref, got = runs["torch"], runs[a.engine]
    bad = [i for i, (r, t) in enumerate(zip(got, ref)) if (r.decided_at, r.prediction) != (t.decided_at, t.prediction)]
    edge, cloud = (m.eval() for m in model.split())
    tracer = Tracer(edge) if a.engine == "onnx" else None
    why = traced_causes(tracer, cloud, split.images, bad, a.batch_size, thresholds, temperatures) if tracer else {}
    row = {
        "checkpoint": a.checkpoint, "engine": a.engine,
        "split": a.split, "n": len(ref),
        "command": "python benchmarks/engine_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "weights_sha256": hashlib.sha256((Path(a.checkpoint) / "model.safetensors").read_bytes()).hexdigest(),
        "thresholds": thresholds, "temperatures": temperatures, "threads": 1,
        "same_decision": sum(r.decided_at == t.decided_at for r, t in zip(got, ref)),
        "same_prediction": sum(r.prediction == t.prediction for r, t in zip(got, ref)),
        "same_both": len(ref) - len(bad),
        "accuracy": {e: sum(d.prediction == d.label for d in ds) / len(ds) for e, ds in runs.items()},
        "exit_fraction": {e: sum(d.decided_at != "cloud" for d in ds) / len(ds) for e, ds in runs.items()},
        "disagreements": [{"index": ref[i].index, "torch": [ref[i].decided_at, ref[i].prediction],
                           "engine": [got[i].decided_at, got[i].prediction],
                           **why.get(i, {})} for i in bad],
    }
    if tracer:
        row["context"] = context(tracer, split.images[: a.trace_images], a.batch_size)
    if a.fp64_check:
        d64 = float64_decisions(model, split, thresholds, temperatures, a.batch_size)
        row["float64_torch"] = {e: {"same_decision": sum(r.decided_at == t.decided_at for r, t in zip(runs[e], d64)),
                                    "same_prediction": sum(r.prediction == t.prediction for r, t in zip(runs[e], d64)),
                                    "same_both": sum((r.decided_at, r.prediction) == (t.decided_at, t.prediction)
                                                     for r, t in zip(runs[e], d64))} for e in runs}
        if not tracer:  # packed: each disagreement against the float64 network and the exit entropies
            for d in row["disagreements"]:
                i = next(k for k, r in enumerate(ref) if r.index == d["index"])
                d["cause"] = untraced_cause(ref[i], got[i], d64[i], thresholds)
    if a.torch_batch_check:
        other = evaluate_conditional(model, split, thresholds, temperatures, a.torch_batch_check)
        row["torch_self_agreement"] = {
            "batch_sizes": [a.batch_size, a.torch_batch_check],
            "same_decision": sum(r.decided_at == t.decided_at for r, t in zip(other, ref)),
            "same_prediction": sum(r.prediction == t.prediction for r, t in zip(other, ref)),
            "same_both": sum((r.decided_at, r.prediction) == (t.decided_at, t.prediction) for r, t in zip(other, ref))}
    update_rows(Path(a.out), row)
    print(json.dumps({k: v for k, v in row.items() if k != "disagreements"} |
                     {"causes": [d.get("cause") for d in row["disagreements"]]}))
    return row


if __name__ == "__main__":
    main()
