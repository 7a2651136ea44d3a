"""Feature codecs against "send the image" -> results/codecs.json.

    python benchmarks/codecs.py [--part images|features|all] [--data-dir data] [--limit N] [--out results/codecs.json]

images: every CIFAR-10 test image encoded as raw uint8, PNG (Pillow, optimize), WebP and JPEG at a few qualities,
  decoded and classified by the float network (``checkpoints/c10-r32-fp32``): bytes per image (the encoded file)
  and accuracy on the full test set.
features: for each hybrid checkpoint (the 20E main one, the 16E joint one where it exists, and the 20E checkpoint
  that carries the learned codec) and each codec: the real conditional run (edge, exits, cloud on the samples that
  did not exit), with the offloaded features sent through the codec as wire frames of one sample each
  (``evaluate.evaluate_split``, every codec in the same pass): bytes per offloaded sample (the whole frame a
  batch-size-1 edge sends), bytes per input, test accuracy and its change against the fp32 codec, encode and decode
  time per sample (one thread, measured while other jobs share the machine: compare within a row set, not across
  machines). The q codecs choose their clip quantile on the checkpoint's VALIDATION split (accuracy of the offloaded
  samples, ties to the smaller payload), then run once on test.
energy: per link (links.LINKS), the edge's energy per image (compute + transmit) for each codec at the measured
  exit rate, against sending each image format, and the exit rate above which the hybrid's edge spends less.
Parts are merged into the existing JSON, so they can run separately.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FP32 = "checkpoints/c10-r32-fp32"
HYBRIDS = ["checkpoints/c10-r32-e20-b1-x20-xnor", "runs/checkpoints/c10-r32-e16-b1-x16-joint"]
IMAGE_FORMATS = [("raw", None), ("png", None), ("webp", 50), ("webp", 75), ("webp", 90), ("webp", "lossless"),
                 ("jpeg", 50), ("jpeg", 75), ("jpeg", 90)]
FEATURE_CODECS = ["fp32", "fp32+zstd", "fp16+zstd", "int8+zstd", "q4", "q3", "q2", "q1"]
CLIP_P = (0.0005, 0.002, 0.005, 0.01)


def _encode_image(img: np.ndarray, fmt: str, quality) -> bytes:
    from PIL import Image

    if fmt == "raw":
        return img.tobytes()
    im = Image.fromarray(img)
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, "PNG", optimize=True)
    elif fmt == "webp":
        opts = {"lossless": True} if quality == "lossless" else {"quality": quality}
        im.save(buf, "WEBP", method=6, **opts)
    else:
        im.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _decode_image(data: bytes, fmt: str) -> np.ndarray:
    from PIL import Image

    if fmt == "raw":
        return np.frombuffer(data, np.uint8).reshape(32, 32, 3)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@torch.no_grad()
def _accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    preds = torch.cat([model(images[i:i + 500])[-1].argmax(1) for i in range(0, len(images), 500)])
    return int((preds == labels).sum()) / len(labels)


def part_images(ds, limit) -> dict:
    from hybridexit.model.checkpoint import load_model

    model, _ = load_model(FP32)
    test = ds.test.limit(limit)
    hwc = test.images.permute(0, 2, 3, 1).contiguous().numpy()
    rows = []
    for fmt, q in IMAGE_FORMATS:
        t0 = time.perf_counter()
        blobs = [_encode_image(im, fmt, q) for im in hwc]
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        dec = np.stack([_decode_image(b, fmt) for b in blobs])
        t_dec = time.perf_counter() - t0
        x = torch.from_numpy(dec).permute(0, 3, 1, 2).contiguous()
        lossless = bool(fmt in ("raw", "png") or q == "lossless")
        if lossless and not torch.equal(x, test.images):
            raise SystemExit(f"{fmt} is supposed to be lossless but changed pixels")
        if lossless and rows:  # the same pixels as the raw image: the same predictions
            acc = rows[0]["accuracy"]
        else:
            acc = _accuracy(model, x, test.labels)
        name = fmt if q is None else f"{fmt}-{q}"
        sizes = np.array([len(b) for b in blobs])
        rows.append({"format": name, "bytes_mean": float(sizes.mean()), "bytes_median": float(np.median(sizes)),
                     "accuracy": acc, "lossless": lossless,
                     "encode_ms_per_image": 1000 * t_enc / len(blobs), "decode_ms_per_image": 1000 * t_dec / len(blobs)})
        print(f"  {name:<14}{sizes.mean():8.0f} B  accuracy {100 * acc:.2f} %", file=sys.stderr, flush=True)
    return {"network": FP32, "n": len(test), "rows": rows}


def _choose_clip(name, ckpt, model, val, val_feats, thresholds, temps) -> tuple[float, dict]:
    """Clip quantile of a q codec, chosen on the validation split (offloaded accuracy, then payload): every
    candidate in one pass over ``val``."""
    from hybridexit import codecs
    from hybridexit.workflows import evaluate

    cands = {str(p): evaluate.WireCodec(codecs.get(name, calibration=val_feats, clip_p=p), ckpt) for p in CLIP_P}
    run = evaluate.evaluate_split(model, val, thresholds, temps, codecs=cands, plain=False)
    best, seen = None, {}
    for p in CLIP_P:
        r = run.codec_figures(str(p))
        seen[str(p)] = {"accuracy": r["accuracy"], "payload_bytes_per_offloaded": r["payload_bytes_per_offloaded"]}
        key = (r["accuracy"], -r["payload_bytes_per_offloaded"])
        if best is None or key > best[0]:
            best = (key, p)
    return best[1], seen


def part_features(ds, limit, only=None, names=None, sweep=False) -> dict:
    """Every codec on each hybrid checkpoint; the edge runs once per split, the codecs on its offloaded features."""
    from hybridexit import codecs
    from hybridexit.data import get_split
    from hybridexit.model.checkpoint import load_model, read_val_ids
    from hybridexit.workflows import evaluate

    out = []
    ckpts = [c for c in HYBRIDS if (ROOT / c).is_dir()] + sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "checkpoints").glob("*") if (p / codecs.CODEC_FILE).is_file())
    ckpts = list(only) if only else ckpts  # --checkpoints: these, also one whose codec sits in its codec/ folder
    for ckpt in ckpts:
        model, meta = load_model(ckpt)
        policy = meta["policy"]
        temps = policy.temperatures or None
        learned = codecs.required_codec(ckpt) is not None
        val = val_feats = None
        todo = [codecs.LEARNED] if learned else (names or FEATURE_CODECS)
        if not learned and any(n in codecs.QUANT_NAMES for n in todo):  # q codecs' clip ranges
            val = get_split(ds, "val", val_ids=read_val_ids(ckpt))
            val_feats = evaluate.offloaded_features(model, val, policy.thresholds, temps)
        built, chosen = {}, {}
        for name in todo:
            if name in codecs.QUANT_NAMES:  # the default clip quantile; --sweep also records the others on val
                p, seen = codecs.DEFAULT_CLIP_P, None
                if sweep:
                    p, seen = _choose_clip(name, ckpt, model, val, val_feats, policy.thresholds, temps)
                built[name], chosen[name] = codecs.get(name, calibration=val_feats, clip_p=p), {"clip_p": p,
                                                                                               "val_sweep": seen}
            else:
                built[name] = codecs.get(name, checkpoint=ckpt)
        # one pass over the test images: the edge decides once, every codec sends the same offloaded features
        run = evaluate.evaluate_split(model, ds.test.limit(limit), policy.thresholds, temps, plain=False,
                                      codecs={n: evaluate.WireCodec(c, ckpt) for n, c in built.items()})
        rows, base = [], None
        for name, codec in built.items():
            r = run.codec_figures(name)
            if name == "fp32":
                base = r["accuracy"]
            row = {"codec": name, **{k: r[k] for k in ("n", "accuracy", "edge_fraction", "payload_bytes_per_offloaded",
                                                        "payload_bytes_per_input", "encode_ms_per_sample",
                                                        "decode_ms_per_sample", "encode_cpu_ms_per_sample",
                                                        "decode_cpu_ms_per_sample", "codec_edge_macs",
                                                        "codec_cloud_macs")}}
            home = codecs.codec_home(ckpt) if name == codecs.LEARNED else None
            if home is not None:  # which codec files made the row
                row["codec_files"] = {"folder": str(home), "format": codec.format,
                                      "codec_safetensors_sha256": _sha256(home / codecs.CODEC_TENSORS),
                                      "codec_json_sha256": _sha256(home / codecs.CODEC_FILE)}
            if name in chosen:
                row["clip_chosen_on_val"] = chosen[name]
            rows.append(row)
            print(f"  {ckpt} {name:<10}{r['payload_bytes_per_offloaded']:8.0f} B/offloaded  {100 * r['accuracy']:.2f} %",
                  file=sys.stderr, flush=True)
        against = ckpt
        if learned:  # compared with the fp32 codec of the checkpoint it was trained from (same edge, same exits)
            against = json.loads((ROOT / ckpt / codecs.CODEC_FILE).read_text())["trained"]["init"]
            base = next((r["accuracy"] for e in out if e["checkpoint"] == against for r in e["rows"]
                         if r["codec"] == "fp32" and e["thresholds"] == list(policy.thresholds)), None)
            if base is None and (ROOT / against).is_dir():  # its fp32 codec at these thresholds, measured now
                ref, _ = load_model(against)
                base = evaluate.evaluate_codec(ref, ds.test.limit(limit), policy.thresholds, codecs.get("fp32"),
                                               against, temps)["accuracy"]
        for row in rows:
            row["accuracy_change_vs_fp32_points"] = None if base is None else 100 * (row["accuracy"] - base)
        out.append({"checkpoint": ckpt, "split_at_layer": model.cfg.edge_layers, "thresholds": list(policy.thresholds),
                    "fp32_reference": against, "rows": rows, "model_sha256": _sha256(ROOT / ckpt / "model.safetensors"),
                    "command": "python benchmarks/codecs.py " + " ".join(sys.argv[1:])})
    return {"checkpoints": out}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fp32_references(res: dict) -> None:
    """Accuracy change of each row against the fp32 codec of its reference checkpoint (a learned-codec checkpoint's
    reference is the checkpoint it was trained from, measured in another run of this script at the same exit
    thresholds; where that run used other thresholds, the change part_features measured itself is kept)."""
    fp32 = {(e["checkpoint"], tuple(e["thresholds"])): r["accuracy"]
            for e in res.get("features", {}).get("checkpoints", []) for r in e["rows"] if r["codec"] == "fp32"}
    for e in res.get("features", {}).get("checkpoints", []):
        base = fp32.get((e.get("fp32_reference", e["checkpoint"]), tuple(e["thresholds"])))
        if base is None:
            continue
        for r in e["rows"]:
            r["accuracy_change_vs_fp32_points"] = None if base is None else 100 * (r["accuracy"] - base)


def part_energy(res: dict) -> dict:
    if "features" not in res or "images" not in res:
        return {}
    from hybridexit.codecs import links
    from hybridexit.codecs.links import transmit_report
    from hybridexit.model.checkpoint import load_model
    from hybridexit.model.energy import energy_report

    fp32_uj = energy_report(load_model(FP32)[0].cfg).fp32_uj
    out = []
    for entry in res["features"]["checkpoints"]:
        model, _ = load_model(entry["checkpoint"])
        report = energy_report(model.cfg)
        for row in entry["rows"]:
            for name in links.LINKS:
                lk = links.link(name)
                t = transmit_report(report, [row["edge_fraction"]], row["payload_bytes_per_offloaded"] or 0, lk,
                                    row["codec_edge_macs"], row["codec_cloud_macs"])
                img = {r["format"]: r["bytes_mean"] for r in res["images"]["rows"]}
                out.append({"checkpoint": entry["checkpoint"], "codec": row["codec"], "link": name, **t,
                            "send_image_edge_uj": {f: lk.transmit_uj(b) for f, b in img.items()},
                            "break_even_exit_rate": {f: t_break(report, row, lk, b) for f, b in img.items()},
                            "fp32_cloud_uj": fp32_uj,
                            **({"weights_sha256": entry["weights_sha256"]} if "weights_sha256" in entry else {})})
    return {"rows": out}


def t_break(report, row, lk, image_bytes):
    from hybridexit.codecs.links import break_even_exit_rate

    return break_even_exit_rate(report, row["payload_bytes_per_offloaded"] or 0, lk, image_bytes, row["codec_edge_macs"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="all", choices=["images", "features", "energy", "all"])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--limit", type=int, default=None, help="first N test images (smoke runs only)")
    ap.add_argument("--out", default="results/codecs.json")
    ap.add_argument("--checkpoints", nargs="*", default=None, help="only these hybrid checkpoints")
    ap.add_argument("--codecs", nargs="*", default=None, help=f"only these codecs (default {' '.join(FEATURE_CODECS)})")
    ap.add_argument("--sweep", action="store_true", help="choose each q codec's clip quantile on val (slow)")
    ap.add_argument("--render", action="store_true", help="only rewrite docs/codecs.md's table from the JSON")
    a = ap.parse_args(argv)
    if a.render:
        render_doc(json.loads(Path(a.out).read_text()), ROOT / "docs" / "codecs.md")
        return
    torch.set_num_threads(1)
    from hybridexit.data import load_cifar

    ds = load_cifar("cifar10", a.data_dir)
    out = Path(a.out)
    images = part_images(ds, a.limit) if a.part in ("images", "all") else None
    new = part_features(ds, a.limit, a.checkpoints, a.codecs, a.sweep) if a.part in ("features", "all") else None
    res = json.loads(out.read_text()) if out.exists() else {}  # read at the end: parts may run side by side
    if images is not None:
        res["images"] = images
    if new is not None:
        keep = [e for e in res.get("features", {}).get("checkpoints", [])
                if e["checkpoint"] not in {n["checkpoint"] for n in new["checkpoints"]}]
        res["features"] = {"checkpoints": keep + new["checkpoints"]}
    _fp32_references(res)
    res["energy"] = part_energy(res)
    res["machine"] = {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                      "threads": 1, "note": "2 shared CPU cores, other jobs running: timings are indicative"}
    res["generated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    res["command"] = "python benchmarks/codecs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps(res, indent=1) + "\n")



# ---------------------------------------------------------------------------------------------- docs
BEGIN, END = "<!-- codecs:begin (generated by benchmarks/codecs.py --render) -->", "<!-- codecs:end -->"


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.2f} %"


def render(res: dict) -> str:
    """The generated part of docs/codecs.md: feature codecs beside the image baselines, and the energy table."""
    lines = []
    if "features" in res:
        lines += ["| checkpoint | codec | B per offloaded | B per input | test accuracy | vs fp32 codec | edge decides | "
                  "encode / decode ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        order = sorted(res["features"]["checkpoints"], key=lambda e: (-e["split_at_layer"],
                                                                     e["checkpoint"] != e.get("fp32_reference")))
        for e in order:
            for r in e["rows"]:
                d = r["accuracy_change_vs_fp32_points"]
                lines.append(f"| {Path(e['checkpoint']).name} | {r['codec']} | {r['payload_bytes_per_offloaded']:,.0f} | "
                             f"{r['payload_bytes_per_input']:,.0f} | {_pct(r['accuracy'])} | "
                             f"{'n/a' if d is None else f'{d:+.2f} pt'} | {_pct(r['edge_fraction'])} | "
                             f"{r['encode_ms_per_sample']:.{2 if 'encode_cpu_ms_per_sample' in r else 1}f} / "
                             f"{r['decode_ms_per_sample']:.{2 if 'encode_cpu_ms_per_sample' in r else 1}f} |")
        lines.append("")
    if "images" in res:
        lines += [f"Sending the image instead, classified by the float network `{res['images']['network']}` "
                  f"({res['images']['n']:,} test images):", "",
                  "| format | mean B per image | median B | test accuracy |", "| --- | --- | --- | --- |"]
        for r in res["images"]["rows"]:
            lines.append(f"| {r['format']} | {r['bytes_mean']:,.0f} | {r['bytes_median']:,.0f} | {_pct(r['accuracy'])} |")
        lines.append("")
    rows = res.get("energy", {}).get("rows", [])
    if rows:
        fmts = [f for f in ("raw", "png", "webp-90", "webp-75") if f in rows[0]["send_image_edge_uj"]]
        lines += ["Edge energy per image (compute + transmit, uJ) at the measured exit rate, against transmitting the "
                  "image, and the exit rate from which the hybrid's edge spends less than transmitting that image:", "",
                  "| checkpoint | codec | link | edge compute | transmit | edge total | "
                  + " | ".join(f"send {f}" for f in fmts) + " | " + " | ".join(f"break-even vs {f}" for f in fmts) + " |",
                  "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in fmts * 2) + " |"]
        for r in sorted(rows, key=lambda r: (r["link"] != "ble", r["link"] != "wifi", r["codec"] != "bn")):
            if r["link"] not in ("ble", "wifi", "lte") or r["codec"] not in ("fp32", "int8+zstd", "q2", "bn") \
                    or "e20" not in r["checkpoint"]:
                continue
            be = [("never" if r["break_even_exit_rate"][f] is None else f"{100 * r['break_even_exit_rate'][f]:.1f} %")
                  for f in fmts]
            lines.append(f"| {Path(r['checkpoint']).name} | {r['codec']} | {r['link']} | {r['edge_compute_uj']:.1f} | "
                         f"{r['transmit_uj']:.1f} | {r['edge_total_uj']:.1f} | "
                         + " | ".join(f"{r['send_image_edge_uj'][f]:.1f}" for f in fmts) + " | " + " | ".join(be) + " |")
        lines.append("")
    lines += _statement(res) + _targets(res)
    lines.append(f"Generated from `results/codecs.json` ({res.get('generated', '?')}; {res.get('command', '')}).")
    return "\n".join(lines)


def _statement(res: dict) -> list[str]:
    """Where the hybrid with the smallest-payload codec of the 20E split beats sending the image, per link."""
    rows = [r for r in res.get("energy", {}).get("rows", []) if "e20" in r["checkpoint"]]
    if not rows or "images" not in res:
        return []
    best = min(rows, key=lambda r: r["bytes_per_offloaded"])
    acc = {r["format"]: r["accuracy"] for r in res["images"]["rows"]}
    hyb = next(r["accuracy"] for e in res["features"]["checkpoints"] if e["checkpoint"] == best["checkpoint"]
               for r in e["rows"] if r["codec"] == best["codec"])
    out = [f"With `{best['codec']}` ({best['bytes_per_offloaded']:,.0f} B per offloaded sample, {100 * hyb:.2f} % test "
           f"accuracy) and the measured {100 * best['exit_rate'][0]:.2f} % of inputs exiting, the hybrid's edge spends "
           f"less energy than sending:"]
    for r in rows:
        if r["codec"] != best["codec"] or r["checkpoint"] != best["checkpoint"]:
            continue
        wins = [f for f, b in r["break_even_exit_rate"].items() if b is not None and b <= r["exit_rate"][0]]
        out.append(f"- over {r['link']} ({r['uj_per_bit']} uJ/bit): the raw image and every format in the image "
                   f"table of {min(r['send_image_edge_uj'][f] for f in wins) / r['uj_per_bit'] / 8:,.0f} B or more "
                   f"({', '.join(wins)}); not the smaller ones, unless at least "
                   + ", ".join(f"{100 * b:.1f} % exit ({f}, {100 * acc[f]:.2f} % accuracy)"
                               for f, b in r["break_even_exit_rate"].items() if f not in wins and b is not None) + ".")
    return out + [""]


def _targets(res: dict) -> list[str]:
    """The issue's targets at the 20E split, judged on the rows above: within each budget, the codec that loses the
    least against the fp32 codec at the same exit thresholds (checkpoints at other thresholds are other operating
    points, so absolute accuracies are not compared across them)."""
    rows = [(e, r) for e in res.get("features", {}).get("checkpoints", []) if e.get("split_at_layer") == 20
            for r in e["rows"] if r["accuracy_change_vs_fp32_points"] is not None]
    out = []
    for budget, what in ((1024, "floor"), (512, "goal")):
        fit = [(e, r) for e, r in rows if r["payload_bytes_per_offloaded"] <= budget]
        if not fit:
            out.append(f"- {what} (<= {budget} B per offloaded sample, within 0.2 point of the fp32 codec): no codec "
                       f"measured here fits the budget.")
            continue
        e, r = max(fit, key=lambda er: er[1]["accuracy_change_vs_fp32_points"])
        d = r["accuracy_change_vs_fp32_points"]
        out.append(f"- {what} (<= {budget} B per offloaded sample, within 0.2 point of the fp32 codec): best is "
                   f"`{r['codec']}` on {Path(e['checkpoint']).name}, {r['payload_bytes_per_offloaded']:,.0f} B per "
                   f"offloaded sample at {d:+.2f} points ({100 * r['edge_fraction']:.2f} % of test images exiting): "
                   f"{'met' if d >= -0.2 else 'missed'}.")
    for e, r in rows:  # the codecs measured with their CPU time too (this version's coder): the headline's
        if r["codec"] != "bn" or "encode_cpu_ms_per_sample" not in r:
            continue
        d, b = r["accuracy_change_vs_fp32_points"], r["payload_bytes_per_offloaded"]
        for budget, what in ((1024, "floor"), (512, "goal")):
            out.append(f"- {what} on {Path(e['checkpoint']).name} (its own operating point, "
                       f"{100 * r['edge_fraction']:.2f} % of test images exiting): `bn`, {b:,.0f} B per offloaded sample "
                       f"({'within' if b <= budget else 'over'} {budget:,}) at {d:+.2f} points "
                       f"({'within' if d >= -0.2 else 'not within'} 0.2): {'met' if b <= budget and d >= -0.2 else 'missed'}.")
        worst = max(r["encode_ms_per_sample"], r["decode_ms_per_sample"])
        out.append(f"- speed (encode and decode each <= 1 ms per offloaded sample, batch 1, one thread; goal 0.3 ms): "
                   f"`bn` on {Path(e['checkpoint']).name}, {r['encode_ms_per_sample']:.2f} ms to encode and "
                   f"{r['decode_ms_per_sample']:.2f} ms to decode (wall, mean over the offloaded test samples; this "
                   f"thread's CPU time {r['encode_cpu_ms_per_sample']:.2f} / {r['decode_cpu_ms_per_sample']:.2f} ms): "
                   f"{'goal met' if worst <= 0.3 else 'met' if worst <= 1 else 'missed'}.")
    return out + [""]


def render_selection(sel: dict) -> str:
    """The headline codec's choice on the validation split (results/codecs_selection.json, benchmarks/codec_select.py)."""
    h = sel.get("headline")
    if not h:
        return ""
    f = h["fp32"]
    lines = [f"Chosen on the validation split of `{h['checkpoint']}` ({h['n']:,} images, {h['offloaded']:,} offloaded at "
             f"threshold {', '.join(f'{t:.4f}' for t in h['thresholds'])}; fp32 codec: {_pct(f['val_accuracy'])}, "
             f"{_pct(f['val_offloaded_accuracy'])} on the offloaded samples): the most accurate under "
             f"{h['budget_bytes']:,} B per offloaded sample.", "",
             "| run | best epoch | B per offloaded (val) | val accuracy | offloaded val accuracy | vs fp32 codec |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, e in h["runs"].items():
        m = e["measured"]
        if m is None:
            lines.append(f"| {name}{' (chosen)' if name == h['chosen'] else ''} | not measured: {e['why_not']} | | | | |")
            continue
        lines.append(f"| {name}{' (chosen)' if name == h['chosen'] else ''} | {m['chosen_epoch']} | "
                     f"{m['bytes_per_offloaded']:,.0f} | {_pct(m['val_accuracy'])} | "
                     f"{_pct(m['val_offloaded_accuracy'])} | {m['change_vs_fp32_points']:+.2f} pt |")
    return "\n".join(lines + ["", f"Generated from `results/codecs_selection.json` ({h['command']}).", ""])


def render_doc(res: dict, doc: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from splice import splice_file

    sel_path = ROOT / "results" / "codecs_selection.json"
    sel = render_selection(json.loads(sel_path.read_text())) if sel_path.exists() else ""
    splice_file(doc, BEGIN, END, sel + render(res) + "\n")


if __name__ == "__main__":
    main()
