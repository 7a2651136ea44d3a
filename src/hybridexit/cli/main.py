"""The ``hybridexit`` command. Thin: parses arguments, calls the library, prints. Errors: one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..engines import CHOICES as ENGINE_CHOICES
from ..errors import HybridExitError, missing_extra
from .options import (
    POLICY_HELP,
    Parser,
    add_codec_option,
    checkpoint_dir,
    device,
    existing_dir,
    existing_file,
    fraction,
    non_negative_float,
    non_negative_int,
    open_fraction,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    refused,
    threshold,
)

DATA_DIR_HELP = ("folder holding the official CIFAR archive or its extracted folder (default: $HYBRIDEXIT_DATA, "
                 "then the user cache, where a missing dataset is downloaded), or a class-folder dataset "
                 "(ROOT/train/<class>/*.png with val/ or test/, or ROOT/<class>/*.png: docs/backbones.md); on a "
                 "checkpoint, default for a class-folder dataset: the folder it was trained on")
DEVICE_HELP = "torch device: cpu, cuda, cuda:1 ... (default: cuda when present)"
JSON_HELP = "print one JSON object (full precision) instead of the table"


def _net_args(p: argparse.ArgumentParser, classes_default=10):
    p.add_argument("--backbone", default=None,
                   help="network to make a hybrid of: cifar_resnet20/32/44/56/110 (default: the CIFAR ResNet of "
                        "--depth), resnet18, resnet34, resnet50, mobilenetv2 (docs/backbones.md)")
    p.add_argument("--depth", type=positive_int, default=32, help="CIFAR ResNet depth 6n+2 (20, 32, 44, 56, 110)")
    p.add_argument("--classes", type=positive_int, default=classes_default, help="number of classes")
    p.add_argument("--edge-layers", type=non_negative_int, default=0,
                   help="residual-block convs at the edge (even: 10, 16, 20, 24; 0: all in the cloud)")
    p.add_argument("--edge-blocks", type=non_negative_int, default=None,
                   help="blocks at the edge (instead of --edge-layers; a CIFAR ResNet block is 2 layers)")
    p.add_argument("--edge-bits", type=positive_int, default=None,
                   help="edge precision: 1, 2, 4, 8 or 32 (float); default: the backbone's (32; mobilenetv2: 4)")
    p.add_argument("--exits", type=positive_int, nargs="*", default=[],
                   help="exit positions (CIFAR ResNets: layers, each <= edge layers; other backbones: after block N, "
                        "each <= edge blocks)")
    p.add_argument("--exit-pool", choices=["k3", "global", "k2", "k4"], default=None,
                   help="pooling before an exit's classifier: k3 (3x3 average pool, the default), k2 / k4 (2x2, 4x4) "
                   "or global (global average pool)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="side of the (square) input images (default: 32; train: the dataset's, CIFAR 32, a class "
                        "folder's images resized to this side)")


def _net_cfg(a, recipe_network: dict | None = None):
    """The network of the command line; for ``train``, the recipe's network options (``recipes.NETWORK_KEYS``)
    apply where no flag overrides them."""
    from ..errors import ConfigError
    from ..model.resnet import HybridConfig

    kw = dict(recipe_network or {})
    if a.exit_pool is not None:
        kw["exit_pool"] = a.exit_pool
    if a.image_size is not None:
        kw["image_size"] = a.image_size
    if a.backbone is not None:
        kw["backbone"] = a.backbone
    bb = HybridConfig(depth=a.depth, backbone=kw.get("backbone", ""), image_size=kw.get("image_size", 32))
    edge = a.edge_layers
    if a.edge_blocks is not None:
        if a.edge_layers:
            raise ConfigError("give --edge-blocks or --edge-layers, not both")
        edge = a.edge_blocks * (2 if bb.is_cifar else 1)
    bits = a.edge_bits if a.edge_bits is not None else bb.backbone_def.default_edge_bits if edge else 32
    return HybridConfig(depth=a.depth, num_classes=a.classes, edge_layers=edge, edge_bits=bits,
                        exits=tuple(a.exits), **kw)


def _train_config(a):
    """The recipe file's training options (if ``--recipe``), overridden by the options given on the command line;
    what neither sets keeps the library default (every training option's argparse default is None)."""
    from ..workflows.recipes import read_recipe, recipe_fields
    from ..workflows.train import TrainConfig

    kw = read_recipe(a.recipe)[0] if a.recipe else {}
    kw.update({k: getattr(a, k) for k in recipe_fields() if getattr(a, k, None) is not None})
    if "exit_weights" in kw:
        kw["exit_weights"] = tuple(kw["exit_weights"])
    return TrainConfig(**kw)


def _train_option(t: argparse.ArgumentParser, flag: str, help: str, **kw) -> None:
    """A ``TrainConfig`` field as an option: no default of its own (None: the recipe's or the library's applies);
    ``--help`` shows the library default, read from ``TrainConfig``."""
    from ..workflows.recipes import recipe_fields

    default = recipe_fields()[flag[2:].replace("-", "_")].default
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    t.add_argument(flag, default=None, help=f"{help} (default: {shown})" if default not in ((), None) else help, **kw)


def cmd_train(a):
    from ..data.datasets import DATASETS, load_dataset
    from ..workflows.recipes import read_recipe, recipe_data
    from ..workflows.train import train

    data = recipe_data(a.recipe) if a.recipe else {}  # image size, mean/std: the command line overrides the recipe
    data.update({k: getattr(a, k) for k in ("image_size", "mean", "std") if getattr(a, k) is not None})
    a.image_size = data.get("image_size")
    a.classes = DATASETS[a.dataset]["num_classes"] if a.dataset in DATASETS else 10  # a folder's: its class folders
    net = _net_cfg(a, read_recipe(a.recipe)[1] if a.recipe else {})  # network and recipe checked before the data
    tcfg = _train_config(a)
    ds = load_dataset(a.dataset, a.data_dir, **data)
    net = net.replace(num_classes=ds.num_classes)
    meta = train(a.out, net, tcfg, ds, resume=a.resume, device=a.device,
                 stop_after_epochs=a.stop_after_epochs)
    print(json.dumps({"checkpoint": a.out, "epochs_done": meta["epochs_done"], "val_acc": meta["val_acc"],
                      "train_wall_s": meta["train_wall_s"]}))


def _energy_table(a):
    from ..model.energy import EnergyTable

    return EnergyTable(mac32_pj=a.mac32_pj, add32_pj=a.add32_pj, mac1_pj=a.mac1_pj, mem_pj_per_bit=a.mem_pj_per_bit)


def _energy_args(p):
    g = p.add_argument_group("energy table (pJ per operation; defaults: the paper's Table I)")
    g.add_argument("--mac32-pj", type=non_negative_float, default=4.6, help="32-bit float multiply-accumulate")
    g.add_argument("--add32-pj", type=non_negative_float, default=0.9, help="32-bit float addition")
    g.add_argument("--mac1-pj", type=non_negative_float, default=0.2, help="binary MAC; a k-bit MAC costs k times this")
    g.add_argument("--mem-pj-per-bit", type=non_negative_float, default=2.5, help="memory access, per bit")


def _link_args(p):
    g = p.add_argument_group("communication energy (docs/codecs.md)")
    g.add_argument("--link", default=None, choices=["ble", "wifi", "lte", "5g"],
                   help="radio link of the edge: report its transmit energy per image and the total")
    g.add_argument("--uj-per-bit", type=non_negative_float, default=None,
                   help="override the link's energy per transmitted bit (microjoules)")


def _cfg_or_ckpt(a):
    if getattr(a, "checkpoint", None):
        from ..model.checkpoint import load_model

        model, _ = load_model(a.checkpoint)
        return model
    return _net_cfg(a)


def human(key: str, v) -> str:
    """A summary value as people read it: fractions as percentages, other numbers rounded, units where known
    (``--json`` keeps full precision)."""
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        return v["error"] if set(v) == {"path", "error"} else ", ".join(f"{k} {human(k, x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(human(key, x) for x in v) + "]"
    if isinstance(v, float) and ("fraction" in key or "accuracy" in key or "rate" in key):
        return f"{100 * v:.2f} %"
    if isinstance(v, float):
        unit = " uJ" if key.endswith("_uj") else " x" if key == "reduction" else ""
        return f"{v:.4g}{unit}" if key == "thresholds" else f"{v:.2f}{unit}"
    return str(v)


def format_table(d: dict) -> str:
    """One line per key: the key, padded to the longest one, then its value as ``human`` writes it."""
    w = max((len(k) for k in d), default=0) + 2
    return "\n".join(f"{k:<{w}}{human(k, v)}" for k, v in d.items())


def cmd_summary(a):
    from ..model.energy import energy_report, summary_table

    report = energy_report(_cfg_or_ckpt(a), _energy_table(a))
    cfg = report.config
    print(f"{cfg.name} ({cfg.backbone_name} at {cfg.image_size}x{cfg.image_size}, {cfg.notation})")
    print(summary_table(report))


def cmd_energy(a):
    from ..model.energy import energy_report

    report = energy_report(_cfg_or_ckpt(a), _energy_table(a))
    rates = a.exit_rate if a.exit_rate is not None else [0.0] * len(report.config.exits)
    d = report.to_dict(rates)
    if a.link:
        from ..codecs.links import link, transmit_report
        from ..model.resnet import edge_feature_shape
        from ..runtime.wire import frame_bytes

        per_off = a.bytes_per_offloaded
        if per_off is None:  # what the runtime's default codec (fp32, one sample per frame) sends
            per_off = frame_bytes((1, *edge_feature_shape(report.config)), "fp32")
        d["link"] = transmit_report(report, rates, per_off, link(a.link, a.uj_per_bit), image_bytes=a.image_bytes)
    if a.json:
        print(json.dumps(d))
        return
    print(f"{report.config.name}, exit rates {human('exit_rate', rates)}")
    for key in ("fp32_uj", "edge_uj", "cloud_uj", "expected_uj"):
        print(f"  {key:<12}{d[key]:10.2f} uJ per image (compute)")
    print(f"  {'reduction':<12}{d['reduction']:10.2f} x")
    m = d["memory_uj"]
    print(f"  memory access (separate): fp32 {m['fp32']:.1f} uJ, expected {m['expected']:.1f} uJ per image")
    if a.link:
        t = d["link"]
        img = t["send_image"]
        be = t["break_even_exit_rate"]
        print(f"  link {t['link']} ({t['uj_per_bit']} uJ/bit), {t['bytes_per_offloaded']:.0f} B per offloaded sample: "
              f"edge compute {t['edge_compute_uj']:.2f} + transmit {t['transmit_uj']:.2f} = {t['edge_total_uj']:.2f} uJ "
              f"per image; cloud {t['cloud_compute_uj']:.2f}; total {t['expected_total_uj']:.2f} uJ")
        print(f"  sending the image instead ({img['bytes']:.0f} B): edge {img['edge_uj']:.2f} uJ, cloud {img['cloud_uj']:.2f} "
              f"uJ; the hybrid's edge spends less from an exit rate of "
              + ("never (its compute alone costs more)" if be is None else f"{100 * be:.1f} %"))


def _load_data_for(meta, a):
    """The data the checkpoint was trained on (its record: CIFAR, or a class-folder tree), from --data-dir."""
    from ..data.datasets import load_recorded

    return load_recorded(meta.get("data"), a.data_dir)


def cmd_evaluate(a):
    from ..codecs import QUANT_NAMES
    from ..engines import resolve_engine
    from ..model.checkpoint import fingerprint, load_model, split_of
    from ..model.hybrid import resolve_thresholds
    from ..model.policy import read_policy_file
    from ..workflows.evaluate import evaluate_run

    model, meta = load_model(a.checkpoint)
    engine = resolve_engine(a.engine, model.cfg, next(model.parameters()).device)  # auto: the fastest here
    policy = read_policy_file(a.policy, fingerprint(a.checkpoint)) if a.policy else meta["policy"]
    thresholds = a.thresholds if a.thresholds is not None else (policy.thresholds if policy else None)
    temperatures = policy.temperatures or None if policy else None
    resolve_thresholds(model.cfg, thresholds)  # none or a wrong count: refused before the data is read
    codec = _codec_choice(a)  # so is a codec the checkpoint's cloud half cannot read
    folder = None
    if a.images:  # an image folder (FOLDER/<class>/*.png, classes named as the checkpoint's) instead of a split
        from ..data import inputs_from_folder
        from ..data.datasets import Split

        classes = meta.get("data", {}).get("classes")
        folder = inputs_from_folder(a.images, classes, model.cfg.image_size).head(a.limit)
        ok = folder.readable
        if not ok:
            from ..errors import DatasetError

            raise DatasetError(f"none of the {len(folder.labels)} images in {a.images} could be read (first: "
                               f"{next(iter(folder.errors.values()))})")
        split, where = Split(folder.images[ok], folder.labels[ok], "images"), folder.description
    else:
        ds = _load_data_for(meta, a)
        split, where, classes = split_of(a.checkpoint, ds, a.split).limit(a.limit), a.split, ds.classes
    val = split_of(a.checkpoint, _load_data_for(meta, a), "val") if codec in QUANT_NAMES else None  # q codecs' clips
    ev = evaluate_run(model, split, thresholds, temperatures, a.batch_size, progress=not a.json, engine=engine,
                      codec=codec, checkpoint=a.checkpoint, val_split=val)  # one pass (unlabelled: no accuracies)
    summary, recs, coded = ev.summary, ev.decisions, ev.coded
    _link_energy(a, model, summary, coded)
    summary = {"checkpoint": a.checkpoint, "split": where, "engine": engine, **summary}
    if folder is not None:  # every file accounted for: n counts the answered images only
        summary.update(inputs=len(folder.labels), unreadable_inputs=len(folder.errors), **folder.folder_summary())
    if a.out:
        _write_evaluate_records(a.out, recs, classes, coded, folder, engine)
    if a.json:
        print(json.dumps(summary))
    else:
        print(format_table(summary))


def _write_evaluate_records(out, recs, classes, coded, folder, engine: str) -> None:
    """evaluate --out: one JSON record per input, in input order; an unreadable file of an image folder gets the
    record ``edge`` gives it (``decided_at: "unreadable"``, no prediction, the reason in ``error``)."""
    from ..model.records import unreadable_record

    def line(r):
        d = {**r.to_json(classes), "engine": engine}
        if coded:  # the decisions carry the codec's answers already
            d["payload_bytes"] = int(coded["payload_bytes"][r.index])
        if folder is not None:
            d["index"] = folder.readable[r.index]
            d["path"] = folder.paths[d["index"]]
        return d

    rows = [line(r) for r in recs]
    if folder is not None:
        for i, e in folder.errors.items():
            u = {k: v for k, v in unreadable_record(i, int(folder.labels[i]), e, classes).items()
                 if k not in ("latency_ms", "payload_bytes")}
            rows.append({**u, "path": folder.paths[i]})
        rows.sort(key=lambda d: d["index"])
    with open(out, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in rows)


def cmd_export(a):
    from ..engines.export import export_checkpoint

    print(json.dumps(export_checkpoint(a.checkpoint, a.format, a.out)))


def cmd_train_codec(a):
    from ..workflows.train_codec import train_codec

    stages = train_codec(a.checkpoint, a.recipe, a.out, a.data_dir, a.cache_dir)
    print(f"codec run {a.out} (recipe {a.recipe}, checkpoint {a.checkpoint})")
    for name, hist in stages.items():
        best = max(hist, key=lambda h: (h["val_offloaded_acc"], h["epoch"]))  # best/: the last of the best
        print(f"  {name}: {len(hist)} epochs, best validation accuracy of the offloaded samples "
              f"{100 * best['val_offloaded_acc']:.2f} % (epoch {best['epoch']})")
    print(f"export it: hybridexit export-codec {a.out} --out CHECKPOINT")


def cmd_export_codec(a):
    from ..workflows.train_codec import export_codec

    t = export_codec(a.run, a.out)["trained"]
    c = t["config"]
    print(f"{a.out}: learned codec ({c['code_channels']} channels x {c['bits']} bits) from {t['run']}, epoch "
          f"{t['chosen_epoch']}, validation accuracy of the offloaded samples "
          f"{100 * t['val_at_choice']['val_offloaded_acc']:.2f} %; evaluate it with --codec bn")


def _codec_choice(a) -> str | None:
    """evaluate's codec: --codec, else the checkpoint's learned codec; another one than that is refused."""
    from ..codecs import required_codec
    from ..errors import ConfigError

    required = required_codec(a.checkpoint)
    if required and a.codec and a.codec != required:
        raise ConfigError(f"{a.checkpoint}'s cloud half was trained behind the codec {required}: use --codec {required}")
    return a.codec or required


def _link_energy(a, model, summary: dict, coded: dict | None) -> None:
    """evaluate --link: the edge's transmit energy per image over a named link, the offloaded samples' bytes those of
    the run's codec (``coded``) or of fp32 frames. Updates ``summary``."""
    if not a.link:
        return
    from ..codecs import links
    from ..model.energy import energy_report
    from ..runtime import wire

    lk = links.link(a.link, a.uj_per_bit)
    per_off = coded["payload_bytes_per_offloaded"] if coded else wire.frame_bytes((1, *model.split()[0].feature_shape),
                                                                                 "fp32")
    t = links.transmit_report(energy_report(model.cfg), summary["exit_fraction"], per_off or 0, lk,
                              coded["codec_edge_macs"] if coded else 0, coded["codec_cloud_macs"] if coded else 0)
    summary.update({"link": t, "transmit_uj": t["transmit_uj"], "edge_total_uj": t["edge_total_uj"],
                    "expected_total_uj": t["expected_total_uj"]})


def cmd_calibrate(a):
    from ..calibration.calibrate import calibrate_checkpoint
    from ..model.checkpoint import read_config

    meta = read_config(a.checkpoint)
    ds = _load_data_for(meta, a)
    if a.risk is not None:
        from ..calibration.calibrate import calibrate_risk

        res = calibrate_risk(a.checkpoint, ds, a.risk, a.delta, a.risk_kind, a.risk_form, a.temperature,
                             write=a.write, progress=not a.json, policy_out=a.policy_out)
    else:
        target, value = next((t, v) for t, v in (("max_drop", a.max_drop), ("exit_fraction", a.exit_fraction),
                                                 ("min_accuracy", a.min_accuracy)) if v is not None)
        res = calibrate_checkpoint(a.checkpoint, ds, target, value, a.plot, write=a.write, progress=not a.json,
                                   policy_out=a.policy_out)
    if a.json:
        print(json.dumps(res))
        return
    fmt = lambda ts: "none" if ts is None else "[" + ", ".join(f"{t:.4g}" for t in ts) + "]"  # noqa: E731
    print(f"thresholds {fmt(res['previous_thresholds'])} -> {fmt(res['thresholds'])}  "
          f"(chosen on {res['split']}, {res['n']} images, target {res['target']} = {res['value']})")
    print(f"on {res['split']}: accuracy {100 * res['accuracy']:.2f} %, {100 * res['edge_fraction']:.2f} % decided at "
          f"the edge, {res['reduction']:.2f}x less energy than FP32 (final classifier alone: "
          f"{100 * res['cloud_accuracy']:.2f} %)")
    if res.get("guarantee"):
        g = res["guarantee"]
        print(f"guarantee: {g['statement']} (Learn then Test on {g['n']} images, lambda {g['lambda']:.3f}, risk there "
              f"{g['risk_hat']:.4f}); temperatures {fmt(res['temperatures'] or None)}")
    if res["policy_out"]:
        print(f"written to {res['policy_out']}; {a.checkpoint}'s own policy is unchanged. Use it with --policy "
              f"{res['policy_out']} on evaluate and edge")
    else:
        print(f"written to {a.checkpoint}/exit_policy.json (the previous policy is kept in its history)" if res["written"]
              else "dry run: nothing written (pass --policy-out FILE to keep these in a file of their own, or --write "
                   "to make them the checkpoint's exit policy)")


def cmd_sweep(a):
    from ..workflows.sweep import run_sweep

    summary = run_sweep(a.spec, workers=a.workers, ray_address=a.ray, epochs=a.epochs, device=a.device,
                        data_dir=a.data_dir, only=a.only, dry_run=a.dry_run, runs=a.runs, results=a.results,
                        threads=a.threads, stop_after_epochs=a.stop_after_epochs, progress=not a.json,
                        reevaluate=a.reevaluate)
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"sweep {summary['sweep']}: runs in {summary['runs']}, rows in {summary['results']}")
        for e in summary["points"]:
            print(f"  {e['name']:<28}{e['state']:<10}{e['detail']}")
    if a.report and not a.dry_run:
        cmd_report(a)
    if summary["failed"]:
        from ..errors import SweepError

        raise SweepError(f"{len(summary['failed'])} point(s) failed: "
                         + "; ".join(f"{e['name']}: {e['detail']}" for e in summary["failed"]))


def cmd_report(a):
    from ..workflows.report import write_report

    for path in write_report(results_dir=a.results_dir, out=a.out, epochs=a.epochs, force=getattr(a, "force", False)):
        print(path)


def _add_train(sub) -> None:
    """``train``: the network's flags, then every training option (recipe values unless given)."""
    t = sub.add_parser("train", help="train a float or hybrid network (joint or separate optimization, or the cloud half alone)")
    _net_args(t)
    t.add_argument("--dataset", default=None, choices=["cifar10", "cifar100", "folder"],
                   help="dataset to train on: CIFAR, or folder: the class-folder dataset in --data-dir (default: "
                        "folder when --data-dir holds class folders, else cifar10)")
    t.add_argument("--mean", type=non_negative_float, nargs="+", default=None, metavar="M",
                   help="normalization mean per channel, on [0, 1] (default: CIFAR's published statistics, a class "
                        "folder's computed from its training images; also a recipe key)")
    t.add_argument("--std", type=positive_float, nargs="+", default=None, metavar="S",
                   help="normalization standard deviation per channel, with --mean")
    t.add_argument("--data-dir", type=existing_dir, default=None, help=DATA_DIR_HELP)
    t.add_argument("--out", type=output_dir, required=True, help="checkpoint folder to write")
    t.add_argument("--recipe", type=existing_file, default=None,
                   help="training recipe, a TOML file of training options (recipes/*.toml); options given here override it")
    opt = lambda flag, help, **kw: _train_option(t, flag, help, **kw)  # noqa: E731
    opt("--epochs", "training epochs (separate mode: of the backbone)", type=non_negative_int)
    opt("--exit-epochs", "separate mode: epochs for exits on the frozen backbone", type=non_negative_int)
    opt("--stage1-epochs", "two-stage training: epochs with binary activations and float weights before --epochs "
        "(docs/recipes.md)", type=non_negative_int)
    opt("--mode", "cloud: fine-tune only the cloud half of --init on its frozen edge", choices=["joint", "separate", "cloud"])
    opt("--exit-weights", "loss weights, one per exit then the final classifier, summing to 1 (default: 0.6 shared by "
        "the exits, 0.4 final)", type=non_negative_float, nargs="*")
    opt("--batch-size", "training batch size", type=positive_int)
    opt("--optimizer", "sgd: Nesterov momentum; adam: AdamW, decoupled weight decay", choices=["sgd", "adam"])
    opt("--lr", "peak learning rate", type=positive_float)
    opt("--exit-lr", "separate mode: learning rate of the exits", type=positive_float)
    opt("--momentum", "SGD momentum", type=fraction)
    opt("--weight-decay", "weight decay", type=non_negative_float)
    opt("--warmup-epochs", "linear learning-rate warm-up, in epochs, before the cosine decay", type=non_negative_float)
    opt("--label-smoothing", "label smoothing, 0 to 1", type=fraction)
    opt("--init", "initialize from a checkpoint (e.g. the float baseline)", type=checkpoint_dir)
    opt("--teacher", "distill from this checkpoint's final output", type=checkpoint_dir)
    opt("--kd-alpha", "weight of the distillation loss (with --teacher)", type=fraction)
    opt("--kd-temperature", "distillation temperature (with --teacher)", type=positive_float)
    opt("--easy-weight", "cloud mode: loss weight of the samples the frozen exits already decide (1: all alike)",
        type=fraction)
    opt("--seed", "random seed", type=non_negative_int)
    opt("--val-size", "training images held out for validation and calibration", type=non_negative_int)
    opt("--split-seed", "seed of the validation hold-out", type=non_negative_int)
    opt("--limit-train", "train on the first N training images only", type=positive_int)
    opt("--channels-last", "channels-last memory format", action=argparse.BooleanOptionalAction)
    opt("--compile", "torch.compile the training step (faster binary steps)", action=argparse.BooleanOptionalAction)
    opt("--device-data", "fast path: the training split stays on the training device, batches, shuffles and crops are "
        "made there (bit-identical to the host path on the CPU)", action=argparse.BooleanOptionalAction)
    opt("--bf16", "fast path: bf16 autocast for the float layers; quantized convs stay FP32 (changes numerics)",
        action=argparse.BooleanOptionalAction)
    t.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --out")
    t.add_argument("--stop-after-epochs", type=positive_int, default=None,
                   help="stop after N epochs (finish later with --resume)")
    t.add_argument("--device", type=device, default=None, help=DEVICE_HELP)
    t.set_defaults(func=cmd_train)


def _add_summary_energy(sub) -> None:
    """``summary`` and ``energy``: a network from flags or a checkpoint, and the energy table."""
    for name, fn, hlp in (("summary", cmd_summary, "per-layer table: placement, bits, params, MACs, energy"),
                          ("energy", cmd_energy, "energy per image: FP32, edge, cloud, expected, reduction")):
        e = sub.add_parser(name, help=hlp)
        _net_args(e)
        e.add_argument("--checkpoint", type=checkpoint_dir, default=None,
                       help="take the network from a checkpoint instead of flags")
        _energy_args(e)
        if name == "energy":
            e.add_argument("--exit-rate", type=fraction, nargs="*", default=None,
                           help="fraction exiting at each exit (default: 0 for each)")
            _link_args(e)
            e.add_argument("--bytes-per-offloaded", type=non_negative_float, default=None,
                           help="bytes each offloaded sample sends (default: an fp32 frame of the features)")
            e.add_argument("--image-bytes", type=non_negative_float, default=None,
                           help="bytes of the image the 'send the image' alternative sends (default: the network's "
                                "raw uint8 input, channels x image size squared: 3,072 at 32x32)")
            e.add_argument("--json", action="store_true", help=JSON_HELP)
        e.set_defaults(func=fn)


def _add_evaluate(sub) -> None:
    """``evaluate``: a checkpoint on a split or a folder, with an engine, a codec and a link."""
    v = sub.add_parser("evaluate", help="real conditional inference on a split, with energy from measured exits")
    v.add_argument("checkpoint", type=checkpoint_dir, help="checkpoint folder")
    v.add_argument("--data-dir", type=existing_dir, default=None, help=DATA_DIR_HELP)
    v.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="val and train: the checkpoint's own hold-out and training images")
    v.add_argument("--thresholds", type=threshold, nargs="*", default=None,
                   help="exit thresholds, one per exit (default: the checkpoint's exit policy)")
    v.add_argument("--policy", type=existing_file, default=None, metavar="FILE", help=POLICY_HELP)
    v.add_argument("--images", type=existing_dir, default=None,
                   help="a folder of images instead of a split: FOLDER/<class>/*.png (class names as the checkpoint's, "
                        "like torchvision's ImageFolder) or FOLDER/*.png (unlabelled)")
    v.add_argument("--limit", type=positive_int, default=None, help="the first N images of the split")
    v.add_argument("--batch-size", type=positive_int, default=500, help="images per forward pass")
    v.add_argument("--out", type=output_file, default=None, help="write one JSON record per image (JSONL)")
    v.add_argument("--engine", default="auto", choices=list(ENGINE_CHOICES),
                   help="engine of the edge half (default auto: the fastest that can run the checkpoint here, packed "
                        "then onnx then torch; onnx, packed: CPU); the cloud half runs in torch")
    add_codec_option(v, None, "; the offloaded features go through it as wire frames and the bytes are reported "
                              "(default: none, or the checkpoint's learned codec)")
    _link_args(v)
    v.add_argument("--json", action="store_true", help=JSON_HELP)
    v.set_defaults(func=cmd_evaluate)


def _add_export(sub) -> None:
    """``export``: the edge half (and the cloud half) as files for a device runtime."""
    x = sub.add_parser("export", help="write the edge half (and for onnx the cloud half) for a device runtime")
    x.add_argument("checkpoint", type=checkpoint_dir, help="checkpoint folder")
    x.add_argument("--format", required=True, choices=["onnx", "packed"],
                   help="onnx: edge.onnx + cloud.onnx (ONNX Runtime); packed: edge.packed.safetensors (1-bit weights)")
    x.add_argument("--out", required=True, help="output folder (created)")
    x.set_defaults(func=cmd_export)


def _add_train_codec(sub) -> None:
    """``train-codec``: a learned codec for a checkpoint from a codec recipe."""
    k = sub.add_parser("train-codec", help="train a learned feature codec for a checkpoint from a codec recipe "
                       "(docs/codecs.md); the same command resumes")
    k.add_argument("checkpoint", type=checkpoint_dir, help="calibrated checkpoint whose edge and exits stay frozen")
    k.add_argument("--recipe", type=existing_file, required=True,
                   help="codec recipe, a TOML file with [stage1] and optionally [stage2] (recipes/codec-*.toml)")
    k.add_argument("--out", type=output_dir, required=True,
                   help="run folder (stage1/, stage2/, a copy of the recipe); an interrupted run there is continued")
    k.add_argument("--data-dir", type=existing_dir, default=None, help=DATA_DIR_HELP)
    k.add_argument("--cache-dir", type=output_dir, default=None,
                   help="folder for the cached edge features of the training views (default: OUT/views)")
    k.set_defaults(func=cmd_train_codec)


def _add_export_codec(sub) -> None:
    """``export-codec``: the codec of a train-codec run into a checkpoint."""
    xc = sub.add_parser("export-codec", help="the learned codec of a train-codec run: a new codec checkpoint, or (cloud "
                        "half not tuned) the checkpoint's own codec/ folder")
    xc.add_argument("run", type=existing_dir,
                    help="train-codec run folder (its recipe's last stage, finished) or one of its stage folders")
    xc.add_argument("--out", type=output_dir, required=True,
                    help="checkpoint folder to write (must not exist); a run with tune_cloud = false may also name the "
                         "checkpoint it was trained on: its codec goes into OUT/codec/")
    xc.set_defaults(func=cmd_export_codec)


def _add_calibrate(sub) -> None:
    """``calibrate``: thresholds for one target on the validation split."""
    c = sub.add_parser("calibrate", help="choose exit thresholds on the validation split for a target")
    c.add_argument("checkpoint", type=checkpoint_dir, help="checkpoint folder")
    c.add_argument("--data-dir", type=existing_dir, default=None, help=DATA_DIR_HELP)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--max-drop", type=fraction, help="most exits within this accuracy drop (fraction, e.g. 0.01)")
    g.add_argument("--exit-fraction", type=fraction, help="this fraction of samples decided at the edge")
    g.add_argument("--min-accuracy", type=fraction, help="lowest energy with at least this accuracy (fraction)")
    g.add_argument("--risk", type=open_fraction, metavar="EPS",
                   help="Learn then Test: thresholds whose risk is <= EPS with probability >= 1 - DELTA (docs/trust.md)")
    c.add_argument("--delta", type=open_fraction, default=0.1,
                   help="with --risk: allowed failure probability, between 0 and 1 (default 0.1)")
    c.add_argument("--risk-kind", choices=["disagreement", "label"], default="disagreement",
                   help="with --risk: exited answers that differ from the full network's (default) or are wrong")
    c.add_argument("--risk-form", choices=["conditional", "joint"], default="conditional",
                   help="with --risk: share among exited samples (default) or P(exit and bad)")
    c.add_argument("--temperature", action="store_true",
                   help="with --risk: fit a softmax temperature per exit first (stored in the policy)")
    c.add_argument("--plot", type=output_file, default=None, help="PNG of accuracy and energy against the edge fraction")
    w = c.add_mutually_exclusive_group()
    w.add_argument("--write", action="store_true", help="make the chosen thresholds the checkpoint's exit policy")
    w.add_argument("--dry-run", action="store_true", help="only print what would change (the default)")
    w.add_argument("--policy-out", type=output_file, default=None, metavar="FILE",
                   help="write the chosen policy to FILE, for evaluate/edge --policy FILE, leaving the checkpoint's "
                        "own exit policy as it is (e.g. to try a guarantee on a shipped checkpoint)")
    c.add_argument("--json", action="store_true", help=JSON_HELP)
    c.set_defaults(func=cmd_calibrate)


def _add_sweep(sub) -> None:
    """``sweep``: the points of a sweep file, here or on Ray."""
    w = sub.add_parser("sweep", help="design-space exploration: train, calibrate and evaluate every point of a sweep file")
    w.add_argument("spec", type=existing_file, help="sweep file, e.g. sweeps/paper-cifar10.toml")
    w.add_argument("--workers", type=positive_int, default=1,
                   help="points trained at once here, CPU threads divided between them")
    w.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads per point (default: cores / workers; Ray: 1)")
    w.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the points as Ray tasks: auto, ray://HOST:PORT, or local (start a Ray runtime here)")
    w.add_argument("--epochs", type=positive_int, default=None,
                   help="override the recipe's epochs (a long schedule gets its own run folder and results file)")
    w.add_argument("--device", type=device, default=None, help="torch device (default: cuda when present)")
    w.add_argument("--data-dir", type=existing_dir, default=None, help=DATA_DIR_HELP)
    w.add_argument("--only", nargs="+", default=None, metavar="POINT", help="only these points (names or globs)")
    w.add_argument("--runs", type=output_dir, default=None,
                   help="parent folder of the sweep's run folder (default: runs/sweeps)")
    w.add_argument("--results", type=output_file, default=None,
                   help="results store (default: results/sweep-<dataset>.json)")
    w.add_argument("--stop-after-epochs", type=positive_int, default=None,
                   help="time box: every point stops after this many more epochs; the same command resumes")
    w.add_argument("--dry-run", action="store_true", help="list the points and their state; train nothing")
    w.add_argument("--reevaluate", action="store_true",
                   help="calibrate and evaluate the finished points again (on this device) from the checkpoints "
                        "their rows cite; train nothing for them")
    w.add_argument("--report", action="store_true", help="then regenerate the figures and tables (hybridexit report)")
    w.add_argument("--results-dir", default="results", help=argparse.SUPPRESS)
    w.add_argument("--out", default=None, help=argparse.SUPPRESS)
    w.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    w.set_defaults(func=cmd_sweep)


def _add_report(sub) -> None:
    """``report``: the sweeps' figures and tables."""
    r = sub.add_parser("report", help="figures and tables of the sweeps (Fig. 4, Fig. 5, Tables II-IV) from the result rows")
    r.add_argument("--results-dir", type=existing_dir, default="results",
                   help="folder with sweep-cifar10.json, sweep-cifar100.json")
    r.add_argument("--out", type=output_file, default=None,
                   help="markdown file to write the report to (default: RESULTS_DIR/report.md, report-epN.md with "
                        "--epochs); the figures go beside the result rows")
    r.add_argument("--docs", action=refused("the report is a markdown file of its own (--out FILE); the repository's "
                                            "docs/sweep.md is rendered by scripts/render_sweep_doc.py"),
                   help=argparse.SUPPRESS)
    r.add_argument("--epochs", type=positive_int, default=None,
                   help="report the rows of a schedule override (sweep --epochs N: results/sweep-<dataset>-epN.json)")
    r.add_argument("--force", action="store_true",
                   help="replace the --out file even when it would hold fewer results than now (more cells "
                        "'missing'); without it such a report is refused and nothing is written")
    r.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = Parser(prog="hybridexit", description="Conditionally deep hybrid networks across edge and cloud: train, "
               "evaluate and calibrate them, and serve the cloud half to edge devices.")
    p.add_argument("--version", action="version", version=f"hybridexit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in (_add_train, _add_summary_energy, _add_evaluate, _add_export, _add_train_codec, _add_export_codec,
                _add_calibrate, _add_sweep, _add_report):
        add(sub)

    try:
        from .serving import add_parsers
    except ImportError:  # the runtime module is optional
        add_parsers = None
    if add_parsers is not None:
        add_parsers(sub)
    return p


def guarded(fn, prog: str = "hybridexit") -> int:
    """Run ``fn()``; a HybridExitError or an OSError (disk full, permission denied) becomes one line on stderr and
    exit status 2, Ctrl-C status 130, a closed stdout (``hybridexit summary | head``) a quiet exit with status 141,
    as for other commands killed by SIGPIPE."""
    try:
        fn()
        sys.stdout.flush()
    except HybridExitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional dependency imported without errors.need: still one line
        print(f"{prog}: error: {missing_extra(e.name or str(e), 'this command')}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
    except OSError as e:  # the machine's answer (disk full, permission denied, ...), not a bug: one line too
        where = f": {e.filename}" if e.filename else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"hybridexit: warning: {message}\n"


def main(argv=None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # the CLI prints; library warnings become one line, no source
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad argument (one line already printed), --help or --version
        return e.code if isinstance(e.code, int) else 2
    return guarded(lambda: args.func(args))

