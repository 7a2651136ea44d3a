"""Agreement of the edge engines on a split, and the cause of every disagreement -> results/edge_agreement.json.

    hybridexit evaluate CKPT --data-dir data --split test --engine E --json --out DIR/E.jsonl   (E = torch, packed, onnx)
    python benchmarks/edge_agreement.py [--checkpoint CKPT] [--data-dir data] [--records DIR]

Counts per engine how many images get the torch engine's decision and prediction, and the accuracies. For each
image where an engine disagrees, it walks the binary edge block by block from the torch engine's own float input
and finds every binary conv input whose sign differs between the torch engine and the engine's arithmetic:
packed (sum exact, ``fl(alpha * s)``, BatchNorm as one fused multiply-add), onnx (the same, with sums saturated to
[-256, 254] by QLinearConv's 8-bit output): the torch engine computes the same in eval mode
(``quant.quantized_conv_exact``), so a flip can come only from a saturated sum. Each flip is reported with
the pre-sign value in float32 (torch) and in float64 from the same input (``z_exact``): a flip caused by float
rounding has ``|z_exact|`` within a few float32 rounding steps of zero; a saturation is counted apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridexit.data import load_cifar
from hybridexit.engines.packed import fold_bn
from hybridexit.model.checkpoint import load_model
from hybridexit.model.resnet import block_specs

ENGINES = ("packed", "onnx")


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _bits_sum(bits: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """Exact integer sums of the binary conv on sign bits (zero padding), float64."""
    return F.conv2d(torch.where(bits, 1.0, -1.0).double(), torch.where(w >= 0, 1.0, -1.0).double(), stride=stride, padding=1)


def _fl(t: torch.Tensor) -> torch.Tensor:
    return t.float().double()  # round to float32, keep computing in float64


def _bn_sign(x: torch.Tensor, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-sign value, bits) of BatchNorm + sign in the engines' arithmetic: one fused multiply-add (packed: fmaf;
    onnx: float64 Mul + Add), whose sign is the sign of the exact value, computed here in float64."""
    a, b = (t.double()[None, :, None, None] for t in fold_bn(bn))
    z = x * a + b
    return z, z >= 0


def _engine_block(block, x: torch.Tensor, engine: str):
    """One binary block in the engine's arithmetic on the engine's own input x (float64 holding float32 values):
    exact integer sums, ``fl(alpha * s)``, float residual add; onnx sums saturate to [-256, 254]. Returns the
    output and per conv the pre-sign values and the number of saturated sums."""
    out, zs, sat, h = None, {}, {}, x
    for name, q, stride in (("c1", block.c1, block.stride), ("c2", block.c2, 1)):
        z, bits = _bn_sign(h, q.bn)
        w = q.conv.weight.detach()
        s = _bits_sum(bits, w, stride)
        sat[name] = int(((s > 254) | (s < -256)).sum()) if engine == "onnx" and 9 * w.shape[1] > 127 else 0
        if sat[name]:
            s = s.clamp(-256, 254)
        zs[name], h = z, _fl(s * w.abs().mean(dim=(1, 2, 3)).double()[None, :, None, None])
    out = _fl(block.shortcut(x) + h)
    return out, zs, sat


def trace(model, image: torch.Tensor, engine: str) -> dict:
    """Run torch (float32) and an emulation of ``engine`` side by side on one raw image, each on its own
    activations from the stem's output (every engine's stem is torch's, rounded once); list the sign flips (bits
    that differ) at every binary conv input, with both pre-sign values."""
    edge, _ = model.split()
    flips, saturated = [], 0
    with torch.no_grad():
        h_t = edge.stem(edge.normalize(image[None]))
        h_e = h_t.double()
        for i, block in enumerate(edge.blocks):
            zs_t = {}
            hooks = [q.act.register_forward_pre_hook(lambda m, inp, k=k, d=zs_t: d.__setitem__(k, inp[0].double()))
                     for k, q in (("c1", block.c1), ("c2", block.c2))]
            h_t = block(h_t)
            for hk in hooks:
                hk.remove()
            h_e, zs_e, sat = _engine_block(block, h_e, engine)
            saturated += sum(sat.values())
            for name in ("c1", "c2"):
                for pos in ((zs_t[name] >= 0) != (zs_e[name] >= 0)).nonzero().tolist():
                    flips.append({"block": i, "conv": name, "position": pos[1:],
                                  "z_torch": float(zs_t[name][tuple(pos)]), "z_engine": float(zs_e[name][tuple(pos)])})
    first = min((f["block"], f["conv"]) for f in flips) if flips else None
    return {"first_flips": [f for f in flips if (f["block"], f["conv"]) == first], "flips_total": len(flips),
            "saturated_sums": saturated, "emulated_features": h_e.float()}


ROUNDING = 1e-5  # |pre-sign value| below this (BatchNorm outputs are O(1)): a flip by float rounding


def _cause(model, image, engine) -> dict:
    t = trace(model, image, engine)
    first = t["first_flips"]
    if first and all(max(abs(f["z_torch"]), abs(f["z_engine"])) < ROUNDING for f in first):
        cause = f"sign flip of a value within {ROUNDING:g} of zero"
    elif t["saturated_sums"]:
        cause = "saturated QLinearConv sums"
    else:
        cause = "other (no rounding-level flip found)"
    return {"cause": cause, **{k: v for k, v in t.items() if k != "emulated_features"}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/c10-r32-e20-b1-x20-xnor")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--records", default="/tmp/agree", help="folder with torch.jsonl, packed.jsonl, onnx.jsonl")
    p.add_argument("--out", default="results/edge_agreement.json")
    p.add_argument("--saturation-images", type=int, default=200,
                   help="count the onnx engine's saturated QLinearConv sums on the first N test images")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = load_model(a.checkpoint)
    images = load_cifar("cifar10", a.data_dir).test.images
    ref = read(Path(a.records) / "torch.jsonl")
    result = {"checkpoint": a.checkpoint, "split": "test", "n": len(ref),
              "accuracy": {"torch": sum(r["prediction"] == r["label"] for r in ref) / len(ref)}, "engines": {}}
    for engine in ENGINES:
        f = Path(a.records) / f"{engine}.jsonl"
        if not f.exists():
            continue
        recs = read(f)
        assert [r["index"] for r in recs] == [r["index"] for r in ref]
        bad = [i for i, (r, t) in enumerate(zip(recs, ref))
               if (r["decided_at"], r["prediction"]) != (t["decided_at"], t["prediction"])]
        result["accuracy"][engine] = sum(r["prediction"] == r["label"] for r in recs) / len(recs)
        result["engines"][engine] = {
            "same_decision": sum(r["decided_at"] == t["decided_at"] for r, t in zip(recs, ref)),
            "same_prediction": sum(r["prediction"] == t["prediction"] for r, t in zip(recs, ref)),
            "same_both": len(ref) - len(bad),
            "disagreements": [{"index": ref[i]["index"], "torch": [ref[i]["decided_at"], ref[i]["prediction"]],
                               "engine": [recs[i]["decided_at"], recs[i]["prediction"]],
                               **_cause(model, images[ref[i]["index"]], engine)} for i in bad],
        }
    if "onnx" in result["engines"]:
        per_image = sum(2 * s.out_size**2 * s.out_ch for s in block_specs(model.cfg)[: model.cfg.edge_blocks])
        sat = [trace(model, images[i], "onnx")["saturated_sums"] for i in range(a.saturation_images)]
        result["engines"]["onnx"]["saturation"] = {
            "images": a.saturation_images, "images_with_saturated_sums": sum(s > 0 for s in sat),
            "saturated_sums": sum(sat), "binary_conv_sums": per_image * a.saturation_images}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "engines"} |
                     {e: {k: v for k, v in d.items() if k != "disagreements"} for e, d in result["engines"].items()}))
    return result


if __name__ == "__main__":
    main()
