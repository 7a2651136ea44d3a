"""k-bit kernel benchmark -> results/kbit_kernels.json (and one JSON object on stdout).

    python benchmarks/kbit_kernels.py [--checkpoint checkpoints/c100-r32-e24-b4-x24] [--fp32 checkpoints/c100-r32-fp32]
                                      [--data-dir data] [--images 128] [--agree 1000] [--rounds 5]
                                      [--out results/kbit_kernels.json]

One thread. Three parts, each variant timed round-robin ``--rounds`` times, reporting its fastest round (the least
disturbed by other processes on a shared machine):
- ``convs``: one k-bit 3x3 conv of every shape of the checkpoint's edge (2 and 4 bits, random levels, 16 images per
  call), by int8 dot products (``kconv_int``: VNNI / AVX-512BW / AVX2 maddubs) and by bit-serial popcount over bit
  planes (``kconv_bitserial_int``: k_a x k_w binary products, VPOPCNTDQ or a nibble lookup), on the best ISA of
  this CPU and on AVX2; each result checked against torch's integer convolution (``exact``). ``choice``: per bit
  width, the method with the smaller total over the edge's convs (weighted by how many convs have each shape).
- ``blocks``: the checkpoint's k-bit edge blocks in one ``run_kblocks`` call (best ISA and AVX2 forced) against the
  same blocks in float (the FP32 checkpoint's blocks: torch FP32 convs) and the torch k-bit blocks (as trained:
  float convs on quantized values), batch 1 and 64, on the stem outputs of the first ``--images`` test images.
- ``agreement``: on the first ``--agree`` test images, the kernels' edge features against the torch EdgeNet's
  (float32) and both against the same EdgeNet in float64: largest difference, share of features within 1e-4, the
  integer levels of every block's first quantized conv input (the torch quantizer applied to each stream) and the
  last exit's predictions. A level whose input lies within float rounding of a rounding boundary can come out
  either way, and a flipped level perturbs everything after it, so exact agreement is not expected.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from edge_speed import add_run_args, cpu_flags, cpu_name  # this script's folder is on sys.path when run as a script

from hybridexit.data import get_split, load_cifar
from hybridexit.engines.kbit import kbit_block_params, kbit_state, kernel_kweights
from hybridexit.engines.native import kernels
from hybridexit.model.checkpoint import load_model
from hybridexit.model.resnet import block_specs

ISA_NAMES = ("portable", "avx2", "avx512bw", "avx512vnni")
BITSERIAL_NAMES = ("portable", "avx2", "avx512bw", "avx512vpopcntdq")


def fastest(variants: dict, rounds: int) -> dict[str, float]:
    """Fastest wall time (s) of each variant (a no-argument callable), variants interleaved round by round."""
    best = dict.fromkeys(variants, float("inf"))
    with torch.no_grad():
        for fn in variants.values():
            fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def best_bitserial_isa(k) -> int:
    """The bit-serial path's best level here (its level 3 needs VPOPCNTDQ, not VNNI)."""
    u, w = torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1, 3, 3, 1, dtype=torch.int8)
    for isa in (3, 2, 1):
        try:
            k.kconv_bitserial_int(u, w, 2, 1, isa)
            return isa
        except RuntimeError:
            continue
    return 0


def conv_shapes(cfg) -> dict[tuple[int, int, int, int], int]:
    """(cin, cout, input size, stride) of every k-bit conv of the edge -> how many convs have it."""
    count: dict[tuple[int, int, int, int], int] = {}
    for s in block_specs(cfg)[: cfg.edge_blocks]:
        for shape in ((s.in_ch, s.out_ch, s.in_size, s.stride), (s.out_ch, s.out_ch, s.out_size, 1)):
            count[shape] = count.get(shape, 0) + 1
    return count


def measure_convs(k, cfg, rounds: int, n: int = 16) -> dict:
    best, best_bs = k.kbit_best_isa(), best_bitserial_isa(k)
    isas = sorted({best, 1}, reverse=True) if best >= 1 else [0]
    bs_isas = sorted({best_bs, 1}, reverse=True) if best_bs >= 1 else [0]
    rows, totals = [], {}
    for bits in (2, 4):
        z = 2**bits - 1
        for (cin, cout, size, stride), count in conv_shapes(cfg).items():
            g = torch.Generator().manual_seed(cin + cout + size + bits)
            q = torch.randint(0, z + 1, (n, cin, size, size), generator=g)
            w = 2 * torch.randint(0, z + 1, (cout, cin, 3, 3), generator=g) - z
            ref = F.conv2d((2 * q - z).double(), w.double(), stride=stride, padding=1).permute(0, 2, 3, 1)
            u = (2 * q).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            wk, wbias = kernel_kweights(w, bits)
            w_ohwc = w.permute(0, 2, 3, 1).contiguous().to(torch.int8)
            variants = {f"int8[{ISA_NAMES[i]}]": partial(k.kconv_int, u, wk, wbias, cout, bits, stride, i) for i in isas}
            variants |= {f"bitserial[{BITSERIAL_NAMES[i]}]": partial(k.kconv_bitserial_int, u, w_ohwc, bits, stride, i)
                         for i in bs_isas}
            exact = {name: bool(torch.equal(fn().double(), ref)) for name, fn in variants.items()}
            times = fastest(variants, rounds)
            row = {"bits": bits, "cin": cin, "cout": cout, "size": size, "stride": stride, "convs_in_edge": count,
                   "us_per_image": {name: round(1e6 * t / n, 2) for name, t in times.items()}, "exact": exact}
            rows.append(row)
            for name, t in times.items():
                totals.setdefault(bits, {}).setdefault(name, 0.0)
                totals[bits][name] += count * 1e6 * t / n
    choice = {}
    for bits, tot in totals.items():
        int8 = min(v for name, v in tot.items() if name.startswith("int8"))
        bs = min(v for name, v in tot.items() if name.startswith("bitserial"))
        choice[str(bits)] = {"int8_us": round(int8, 1), "bitserial_us": round(bs, 1),
                             "chosen": "int8" if int8 <= bs else "bitserial", "bitserial_over_int8": round(bs / int8, 2)}
    return {"per_shape": rows, "edge_total_us_per_image": {str(b): {n: round(v, 1) for n, v in t.items()}
                                                           for b, t in totals.items()}, "choice": choice}


def _torch_blocks(blocks, xs):
    for x in xs:
        for b in blocks:
            x = b(x)


def _kblocks(k, params, meta, isa, xs):
    for x in xs:
        k.run_kblocks(x, params, meta, isa)


def measure_blocks(k, edge, fblocks, stem_out: torch.Tensor, rounds: int) -> dict:
    params, meta = kbit_block_params(kbit_state(edge), edge.cfg)
    best = k.kbit_best_isa()
    isas = sorted({best, 1}, reverse=True) if best >= 1 else [0]
    nhwc = stem_out.permute(0, 2, 3, 1).contiguous()
    out = {}
    for batch in (1, 64):
        xs = [stem_out[i: i + batch] for i in range(0, len(stem_out), batch)]
        xs_nhwc = [nhwc[i: i + batch] for i in range(0, len(nhwc), batch)]

        variants = {"float": partial(_torch_blocks, fblocks, xs), "torch_kbit": partial(_torch_blocks, edge.blocks, xs)}
        for i in isas:
            variants[f"kbit[{ISA_NAMES[i]}]"] = partial(_kblocks, k, params, meta, i, xs_nhwc)
        times = fastest(variants, rounds)
        ms = {name: 1e3 * t / len(stem_out) for name, t in times.items()}
        out[f"b{batch}"] = {"ms_per_image": {n: round(v, 4) for n, v in ms.items()},
                            "speedup_vs_float": {n: round(ms["float"] / v, 2) for n, v in ms.items() if n.startswith("kbit")},
                            "speedup_vs_torch_kbit": {n: round(ms["torch_kbit"] / v, 2) for n, v in ms.items()
                                                      if n.startswith("kbit")}}
    return out


def _levels(block, h, z):
    """The integer levels of a block's first quantized conv input (the torch quantizer's arithmetic)."""
    return torch.round((block.c1.bn(h).clamp(-1, 1) + 1) * (z / 2))


def measure_agreement(k, edge, images: torch.Tensor) -> dict:
    """Kernels and the torch EdgeNet (float32), each against the other and against the same EdgeNet in float64 (the
    closest to exact arithmetic: the kernels' sums are exact, torch's float32 convs round)."""
    cfg = edge.cfg
    state = kbit_state(edge)
    per_block = [kbit_block_params(state, cfg, i, i + 1) for i in range(cfg.edge_blocks)]
    edge64 = copy.deepcopy(edge).double()
    z = 2**cfg.edge_bits - 1
    head = edge.exits[cfg.exit_key(len(cfg.exits) - 1)] if cfg.exits and cfg.exits[-1] == cfg.edge_layers else None
    pairs = ("kernels_vs_torch", "kernels_vs_float64", "torch_vs_float64")
    same_lv, same_pred = dict.fromkeys(pairs, 0), dict.fromkeys(pairs, 0)
    n_lv, n, maxdiff, close, close_img = 0, 0, 0.0, 0, 0
    with torch.no_grad():
        for x in images.split(100):
            h = edge.stem(edge.normalize(x))
            ht, hk, hd = h, h.permute(0, 2, 3, 1).contiguous(), edge64.stem(edge64.normalize(x).double())
            for i, (block, block64) in enumerate(zip(edge.blocks, edge64.blocks)):
                lv = {"torch": _levels(block, ht, z), "kernels": _levels(block, hk.permute(0, 3, 1, 2), z),
                      "float64": _levels(block64, hd, z)}
                for pair in pairs:
                    a, b = pair.split("_vs_")
                    same_lv[pair] += int((lv[a] == lv[b]).sum())
                n_lv += lv["torch"].numel()
                ht, hd = block(ht), block64(hd)
                hk = k.run_kblocks(hk, *per_block[i], -1)
            feats = {"kernels": hk.permute(0, 3, 1, 2), "torch": ht, "float64": hd}
            d = (feats["kernels"] - ht).abs()
            maxdiff = max(maxdiff, float(d.max()))
            close += int((d <= 1e-4).sum())
            close_img += int((d.flatten(1) <= 1e-4).all(1).sum())
            if head is not None:
                pred = {"kernels": head(feats["kernels"]).argmax(1), "torch": head(ht).argmax(1),
                        "float64": copy.deepcopy(head).double()(hd).argmax(1)}
                for pair in pairs:
                    a, b = pair.split("_vs_")
                    same_pred[pair] += int((pred[a] == pred[b]).sum())
            n += len(x)
    out = {"images": n, "max_abs_feature_diff_kernels_vs_torch": maxdiff,
           "features_within_1e-4_kernels_vs_torch": close / (n * ht[0].numel()),
           "images_all_features_within_1e-4_kernels_vs_torch": close_img / n,
           "block_input_levels_equal": {p: same_lv[p] / n_lv for p in pairs}}
    if head is not None:
        out["last_exit_same_prediction"] = {p: same_pred[p] / n for p in pairs}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/c100-r32-e24-b4-x24")
    p.add_argument("--fp32", default="checkpoints/c100-r32-fp32")
    p.add_argument("--agree", type=int, default=1000)
    add_run_args(p, images=128, out="results/kbit_kernels.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    k = kernels()
    model, meta = load_model(a.checkpoint)
    fp32, _ = load_model(a.fp32)
    edge, _ = model.split()
    edge.eval(), fp32.eval()
    fblocks = fp32.blocks[: model.cfg.edge_blocks]
    dataset = meta.get("data", {}).get("name", "cifar100")
    test = get_split(load_cifar(dataset, a.data_dir), "test")
    with torch.no_grad():
        stem_out = edge.stem(edge.normalize(test.images[: a.images]))
    result = {
        "checkpoint": a.checkpoint, "fp32": a.fp32,
        "weights_sha256": hashlib.sha256((Path(a.checkpoint) / "model.safetensors").read_bytes()).hexdigest(),
        "fp32_weights_sha256": hashlib.sha256((Path(a.fp32) / "model.safetensors").read_bytes()).hexdigest(),
        "command": "python benchmarks/kbit_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical CPUs", "cpu_flags": cpu_flags(), "torch": torch.__version__, "threads": 1,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": a.note,
        "best_isa": ISA_NAMES[k.kbit_best_isa()],
        "convs": measure_convs(k, model.cfg, a.rounds),
        "blocks": measure_blocks(k, edge, fblocks, stem_out, a.rounds),
        "agreement": measure_agreement(k, edge, test.images[: a.agree]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"choice": result["convs"]["choice"], "blocks": result["blocks"], "agreement": result["agreement"]}))
    return result


if __name__ == "__main__":
    main()
