"""The ``hybridexit`` command. Thin: parses arguments, calls the library, prints. Errors: one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import HybridExitError


def _net_args(p: argparse.ArgumentParser, classes_default=10):
    p.add_argument("--depth", type=int, default=32, help="ResNet depth 6n+2 (20, 32, 44, 56, 110)")
    p.add_argument("--classes", type=int, default=classes_default, help="number of classes")
    p.add_argument("--edge-layers", type=int, default=0, help="residual-block convs at the edge (even: 10, 16, 20, 24)")
    p.add_argument("--edge-bits", type=int, default=32, help="edge precision: 1, 2, 4, 8 or 32 (float)")
    p.add_argument("--exits", type=int, nargs="*", default=[], help="exit positions (layers, each <= edge layers)")
    p.add_argument("--exit-pool", choices=["k3", "global"], default="k3", help="exit pooling (authors' code: k3)")


def _net_cfg(a):
    from .resnet import HybridConfig

    return HybridConfig(depth=a.depth, num_classes=a.classes, edge_layers=a.edge_layers, edge_bits=a.edge_bits,
                        exits=tuple(a.exits), exit_pool=a.exit_pool)


def cmd_train(a):
    from .data import load_cifar
    from .train import TrainConfig, train

    ds = load_cifar(a.dataset, a.data_dir)
    a.classes = ds.num_classes
    tcfg = TrainConfig(epochs=a.epochs, exit_epochs=a.exit_epochs, mode=a.mode, exit_weights=tuple(a.exit_weights),
                       batch_size=a.batch_size, optimizer=a.optimizer, lr=a.lr, exit_lr=a.exit_lr,
                       weight_decay=a.weight_decay, label_smoothing=a.label_smoothing, init=a.init, teacher=a.teacher,
                       kd_alpha=a.kd_alpha, easy_weight=a.easy_weight, seed=a.seed, val_size=a.val_size,
                       limit_train=a.limit_train, compile=a.compile)
    meta = train(a.out, _net_cfg(a), tcfg, ds, resume=a.resume, device=a.device,
                 stop_after_epochs=a.stop_after_epochs)
    print(json.dumps({"checkpoint": a.out, "epochs_done": meta["epochs_done"], "val_acc": meta["val_acc"],
                      "train_wall_s": meta["train_wall_s"]}))


def _energy_table(a):
    from .energy import EnergyTable

    return EnergyTable(mac32_pj=a.mac32_pj, add32_pj=a.add32_pj, mac1_pj=a.mac1_pj, mem_pj_per_bit=a.mem_pj_per_bit)


def _energy_args(p):
    g = p.add_argument_group("energy table (pJ per operation; defaults: the paper's Table I)")
    g.add_argument("--mac32-pj", type=float, default=4.6)
    g.add_argument("--add32-pj", type=float, default=0.9)
    g.add_argument("--mac1-pj", type=float, default=0.2, help="binary MAC; a k-bit MAC costs k times this")
    g.add_argument("--mem-pj-per-bit", type=float, default=2.5)


def _cfg_or_ckpt(a):
    if getattr(a, "checkpoint", None):
        from .checkpoint import load_model

        model, _ = load_model(a.checkpoint)
        return model
    return _net_cfg(a)


def cmd_summary(a):
    from .energy import energy_report, summary_table

    report = energy_report(_cfg_or_ckpt(a), _energy_table(a))
    print(report.config.name)
    print(summary_table(report))


def cmd_energy(a):
    from .energy import energy_report

    report = energy_report(_cfg_or_ckpt(a), _energy_table(a))
    rates = a.exit_rate if a.exit_rate is not None else [0.0] * len(report.config.exits)
    d = report.to_dict(rates)
    if a.json:
        print(json.dumps(d))
        return
    print(f"{report.config.name}, exit rates {rates}")
    for key in ("fp32_uj", "edge_uj", "cloud_uj", "expected_uj"):
        print(f"  {key:<12}{d[key]:10.2f} uJ per image (compute)")
    print(f"  {'reduction':<12}{d['reduction']:10.2f} x")
    m = d["memory_uj"]
    print(f"  memory access (separate): fp32 {m['fp32']:.1f} uJ, expected {m['expected']:.1f} uJ per image")


def _load_data_for(meta, a):
    from .data import load_cifar

    return load_cifar(meta.get("data", {}).get("name", "cifar10"), a.data_dir)


def cmd_evaluate(a):
    from .checkpoint import load_model
    from .data import get_split
    from .evaluate import evaluate_checkpoint_summary

    model, meta = load_model(a.checkpoint)
    ds = _load_data_for(meta, a)
    d = meta.get("data", {})
    split = get_split(ds, a.split, d.get("val_size", 5000), d.get("split_seed", 0)).limit(a.limit)
    summary, recs = evaluate_checkpoint_summary(model, split, ds.mean, ds.std, a.thresholds, a.batch_size,
                                                progress=not a.json)
    summary = {"checkpoint": a.checkpoint, "split": a.split, **summary}
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    if a.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:<18}{v}")


def cmd_calibrate(a):
    from .calibrate import calibrate_checkpoint
    from .checkpoint import read_config

    meta = read_config(a.checkpoint)
    ds = _load_data_for(meta, a)
    target, value = next((t, v) for t, v in (("max_drop", a.max_drop), ("exit_fraction", a.exit_fraction),
                                             ("min_accuracy", a.min_accuracy)) if v is not None)
    res = calibrate_checkpoint(a.checkpoint, ds, target, value, a.plot, write=not a.dry_run, progress=not a.json)
    print(json.dumps(res) if a.json else "\n".join(f"{k:<16}{v}" for k, v in res.items()))


def cmd_sweep(a):
    from .sweep import run_sweep

    summary = run_sweep(a.spec, workers=a.workers, ray_address=a.ray, epochs=a.epochs, device=a.device,
                        data_dir=a.data_dir, only=a.only, dry_run=a.dry_run, runs=a.runs, results=a.results,
                        threads=a.threads, stop_after_epochs=a.stop_after_epochs, progress=not a.json)
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"sweep {summary['sweep']}: runs in {summary['runs']}, rows in {summary['results']}")
        for e in summary["points"]:
            print(f"  {e['name']:<28}{e['state']:<10}{e['detail']}")
    if a.report and not a.dry_run:
        cmd_report(a)
    if summary["failed"]:
        from .errors import SweepError

        raise SweepError(f"{len(summary['failed'])} point(s) failed: "
                         + "; ".join(f"{e['name']}: {e['detail']}" for e in summary["failed"]))


def cmd_report(a):
    from .report import write_report

    for path in write_report(results_dir=a.results_dir, docs=a.docs):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridexit", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a float or hybrid network (joint or separate optimization, or the cloud half alone)")
    _net_args(t)
    t.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    t.add_argument("--data-dir", default=None, help="folder with the official archive or its extracted folder")
    t.add_argument("--out", required=True, help="checkpoint directory")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--exit-epochs", type=int, default=0, help="separate mode: epochs for exits on the frozen backbone")
    t.add_argument("--mode", choices=["joint", "separate", "cloud"], default="joint",
                   help="cloud: fine-tune only the cloud half of --init on its frozen edge")
    t.add_argument("--exit-weights", type=float, nargs="*", default=[], help="lambdas: exits then final, sum 1")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd: Nesterov momentum (default); adam: AdamW, decoupled weight decay")
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--exit-lr", type=float, default=0.05)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--init", default=None, help="initialize from a checkpoint (e.g. the float baseline)")
    t.add_argument("--teacher", default=None, help="distill from this checkpoint's final output")
    t.add_argument("--kd-alpha", type=float, default=0.5)
    t.add_argument("--easy-weight", type=float, default=1.0,
                   help="cloud mode: loss weight of training samples the frozen exits already decide under --init's "
                        "calibrated thresholds (1: all alike; lower focuses the cloud on the samples it will see)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-size", type=int, default=5000)
    t.add_argument("--limit-train", type=int, default=None)
    t.add_argument("--compile", action="store_true", help="torch.compile the training step (faster binary steps)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--stop-after-epochs", type=int, default=None)
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_train)

    for name, fn, hlp in (("summary", cmd_summary, "per-layer table: placement, bits, params, MACs, energy"),
                          ("energy", cmd_energy, "energy per image: FP32, edge, cloud, expected, reduction")):
        e = sub.add_parser(name, help=hlp)
        _net_args(e)
        e.add_argument("--checkpoint", default=None, help="take the network from a checkpoint instead of flags")
        _energy_args(e)
        if name == "energy":
            e.add_argument("--exit-rate", type=float, nargs="*", default=None, help="fraction exiting at each exit")
            e.add_argument("--json", action="store_true")
        e.set_defaults(func=fn)

    v = sub.add_parser("evaluate", help="real conditional inference on a split, with energy from measured exits")
    v.add_argument("checkpoint")
    v.add_argument("--data-dir", default=None)
    v.add_argument("--split", default="test", choices=["test", "val", "train"])
    v.add_argument("--thresholds", type=float, nargs="*", default=None, help="override the checkpoint's thresholds")
    v.add_argument("--limit", type=int, default=None, help="the first N images of the split")
    v.add_argument("--batch-size", type=int, default=500)
    v.add_argument("--out", default=None, help="write one JSON record per image (JSONL)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("calibrate", help="choose exit thresholds on the validation split for a target")
    c.add_argument("checkpoint")
    c.add_argument("--data-dir", default=None)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--max-drop", type=float, help="most exits within this accuracy drop (fraction, e.g. 0.01)")
    g.add_argument("--exit-fraction", type=float, help="this fraction of samples decided at the edge")
    g.add_argument("--min-accuracy", type=float, help="lowest energy with at least this accuracy (fraction)")
    c.add_argument("--plot", default=None, help="PNG of accuracy and energy against the edge fraction")
    c.add_argument("--dry-run", action="store_true", help="do not write the thresholds into the checkpoint")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    w = sub.add_parser("sweep", help="design-space exploration: train, calibrate and evaluate every point of a sweep file")
    w.add_argument("spec", help="sweep file, e.g. sweeps/paper-cifar10.toml")
    w.add_argument("--workers", type=int, default=1, help="points trained at once here, CPU threads divided between them")
    w.add_argument("--threads", type=int, default=None, help="CPU threads per point (default: cores / workers; Ray: 1)")
    w.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the points as Ray tasks: auto, ray://HOST:PORT, or local (start a Ray runtime here)")
    w.add_argument("--epochs", type=int, default=None,
                   help="override the recipe's epochs (a long schedule gets its own run folder and results file)")
    w.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    w.add_argument("--data-dir", default=None, help="folder with the CIFAR archive or its extracted folder")
    w.add_argument("--only", nargs="+", default=None, metavar="POINT", help="only these points (names or globs)")
    w.add_argument("--runs", default=None, help="parent folder of the sweep's run folder (default: runs/sweeps)")
    w.add_argument("--results", default=None, help="results store (default: results/sweep-<dataset>.json)")
    w.add_argument("--stop-after-epochs", type=int, default=None,
                   help="time box: every point stops after this many more epochs; the same command resumes")
    w.add_argument("--dry-run", action="store_true", help="list the points and their state; train nothing")
    w.add_argument("--report", action="store_true", help="then regenerate the figures and tables (hybridexit report)")
    w.add_argument("--results-dir", default="results", help=argparse.SUPPRESS)
    w.add_argument("--docs", default="docs/sweep.md", help=argparse.SUPPRESS)
    w.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    w.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="figures and tables of the sweeps (Fig. 4, Fig. 5, Tables II-IV) from the result rows")
    r.add_argument("--results-dir", default="results", help="folder with sweep-cifar10.json, sweep-cifar100.json")
    r.add_argument("--docs", default="docs/sweep.md", help="markdown file whose generated section is rewritten")
    r.set_defaults(func=cmd_report)

    try:
        from .runtime.commands import add_parsers
    except ImportError:  # the runtime module is optional
        add_parsers = None
    if add_parsers is not None:
        add_parsers(sub)
    return p


def guarded(fn, prog: str = "hybridexit") -> int:
    """Run ``fn()``; a HybridExitError becomes one line on stderr and exit status 2, Ctrl-C status 130."""
    try:
        fn()
    except HybridExitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
