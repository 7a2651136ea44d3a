"""The sweeps' figures and tables, beside the paper's values: Fig. 4a/4b, Fig. 5 (PNGs in ``results/``) and
Tables II-IV (markdown), plus Table III as ``results/table3-energy.json``. ``build_report`` returns the markdown; it
writes no repository doc (scripts/render_sweep_doc.py splices it into ``docs/sweep.md``; ``hybridexit report``
writes it as a file of its own).

Every number comes from result rows (``results/sweep-<dataset>.json``; Table II also the committed
``results/cifar10.json``) or from the energy model (Table III). A grid point without rows is listed as missing, never
filled in. The paper's values are typed in from its text (``docs``: /work/shared/paper, Tables II-IV, Sec. III).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import HybridExitError

BITS = (1, 2, 4)
LAYERS = (10, 16, 20, 24)
FIGURE_DATASETS = {"cifar10": {"label": "CIFAR-10", "fig": "fig4a", "prefix": "c10"},
                   "cifar100": {"label": "CIFAR-100", "fig": "fig4b", "prefix": "c100"}}
MAIN = {"cifar10": "c10-r32-e20-b1-x20"}  # the project's main checkpoint, trained outside the sweep
PAPER_SWEEPS = ("sweeps/paper-cifar10.toml", "sweeps/paper-cifar100.toml")

# The paper's numbers (Long, Chakraborty, Roy 2020): Table III in mJ (per 10,000 test images, see the notes),
# Table II (exit %, accuracy %), Table IV (CIFAR-10 20E+10C binary) and the Fig. 4 / Fig. 5 statements of Sec. III.
PAPER_TABLE3 = {(10, 1): (261, 2269), (10, 2): (295, 2108), (10, 4): (363, 2059), (16, 1): (213, 1440),
                (16, 2): (264, 1168), (16, 4): (365, 1089), (20, 1): (236, 991), (20, 2): (299, 805),
                (20, 4): (424, 726), (24, 1): (203, 645), (24, 2): (278, 478), (24, 4): (429, 406)}
PAPER_TABLE2 = {"cifar10": {"separate": (24.1, 88.72), "joint": (52.8, 89.16)},
                "cifar100": {"separate": (17.3, 61.80), "joint": (24.6, 62.50)}}
PAPER_TABLE4 = {"one exit (20)": ([59.3], 88.61, 729), "two exits (10, 20)": ([38.6, 19.7], 85.98, 724)}
# (dataset, point name, row kind, what the paper says in Sec. III about that point of Fig. 4 / Fig. 5)
PAPER_STATEMENTS = [
    ("cifar10", "e10-b1-x10-joint-k3", "without exit", "10E+20C binary, no exit: 1.5x, -1.5 pt"),
    ("cifar100", "e10-b1-x10-joint-k3", "without exit", "10E+20C binary, no exit: 1.5x, -2.1 pt"),
    ("cifar10", "e20-b1-x20-joint-k3", "without exit", "20E+10C binary, no exit: 2.6x"),
    ("cifar10", "e20-b1-x20-joint-k3", "paper threshold", "20E+10C binary, exit at 20: 5.5x, 88.6 %, 59-65 % exit"),
    ("cifar100", "e24-b4-x24-joint-k3", "paper threshold", "24E+6C 4-bit, exit at 24: 4.8x, -1.4 pt, 52 % exit"),
    ("cifar100", "e24-b2-x24-joint-k3", "paper threshold", "2-bit edge (split not stated; ours 24E): 5.3x, -3.0 pt"),
    ("cifar100", "e24-b1-x24-joint-k3", "paper threshold", "binary edge: under 30 % exit (Fig. 5), fewer at 24E"),
]


def load_rows(path) -> list[dict]:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else []


def _index(rows: list[dict]) -> dict:
    return {(r["name"], r["point"]): r for r in rows}


@functools.lru_cache(maxsize=None)
def _energy(cfg):
    """The energy model of a (frozen, hashable) network config, computed once per process."""
    from ..model.energy import energy_report

    return energy_report(cfg)


def table3_rows(num_classes: int = 100, c100_rows: list[dict] | None = None) -> list[dict]:
    """Edge and cloud energy per 10,000 images (mJ) from the energy model, one exit at the end of the edge; the
    cloud column the paper reports depends on how many images exit, so ours is given for none exiting and, where a
    CIFAR-100 sweep row exists, at its measured exit fraction (paper threshold 1.0)."""
    from ..data.datasets import DATASETS as D
    from ..model.resnet import HybridConfig

    d = D["cifar100" if num_classes == 100 else "cifar10"]
    idx = _index(c100_rows or [])
    out = []
    for layers in LAYERS:
        for bits in BITS:
            rep = _energy(HybridConfig(depth=32, num_classes=num_classes, edge_layers=layers, edge_bits=bits,
                                             exits=(layers,), mean=d["mean"], std=d["std"]))
            row = idx.get((f"e{layers}-b{bits}-x{layers}-joint-k3", "paper threshold"))
            measured = None if row is None else 10 * row["cloud_uj"] * (1 - row["edge_fraction"])
            out.append({"edge_layers": layers, "edge_bits": bits, "edge_mj": 10 * rep.edge_uj,
                        "cloud_mj_no_exit": 10 * rep.cloud_uj, "cloud_mj_measured": measured,
                        "exit_fraction": None if row is None else row["edge_fraction"],
                        "paper_edge_mj": PAPER_TABLE3[(layers, bits)][0],
                        "paper_cloud_mj": PAPER_TABLE3[(layers, bits)][1]})
    return out


def _fmt(v, spec=".1f", unit=""):
    return "missing" if v is None else format(v, spec) + unit


def _pct(v):
    return "missing" if v is None else f"{100 * v:.1f}"


def reference_point(dataset: str, rows: list[dict], results_dir: Path) -> tuple[dict | None, str]:
    """The FP32 reference row: the sweep's own, else the committed benchmark row of the FP32 checkpoint."""
    ref = _index(rows).get(("fp32", "reference"))
    if ref is not None:
        return ref, "sweep reference row"
    bench = load_rows(results_dir / f"{dataset}.json")
    name = f"{FIGURE_DATASETS[dataset]['prefix']}-r32-fp32"
    for r in (bench.get("points", []) if isinstance(bench, dict) else []):
        if r["name"] == name:
            return r, f"{results_dir.as_posix()}/{dataset}.json, {name}"
    return None, "missing"


def main_rows(dataset: str, results_dir: Path) -> list[dict]:
    """The committed long-schedule main checkpoint's rows (CIFAR-10 20E binary), shown beside the sweep's points."""
    bench = load_rows(results_dir / f"{dataset}.json")
    name = MAIN.get(dataset)
    points = bench.get("points", []) if isinstance(bench, dict) else []
    return [r for r in points if name and r["checkpoint"].rsplit("/", 1)[-1] == name
            and r["point"] in ("calibrated", "paper threshold")]


def _curve(idx: dict, bits: int, kind: str) -> list[tuple[int, dict]]:
    pts = [(L, idx.get((f"e{L}-b{bits}-x{L}-joint-k3", kind))) for L in LAYERS]
    return [(L, r) for L, r in pts if r is not None]


def plot_fig4(dataset: str, rows: list[dict], results_dir: Path, path: Path) -> None:
    """Accuracy vs expected energy per image: one colour per bit width; dashed without exit, solid with the exit
    at the paper's threshold, dotted with the validation-calibrated threshold; the FP32 network as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(rows)
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    styles = {"without exit": ("--", "s"), "paper threshold": ("-", "o"), "calibrated": (":", "x")}
    for bits, colour in zip(BITS, ("tab:blue", "tab:orange", "tab:green")):
        for kind, (ls, marker) in styles.items():
            pts = _curve(idx, bits, kind)
            if not pts:
                continue
            xs, ys = [r["expected_uj"] for _, r in pts], [100 * r["accuracy"] for _, r in pts]
            ax.plot(xs, ys, ls=ls, marker=marker, color=colour, label=f"{bits}-bit, {kind}")
            if kind == "paper threshold":
                for (layers, _), x, y in zip(pts, xs, ys):
                    ax.annotate(f"{layers}E", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ref, _ = reference_point(dataset, rows, results_dir)
    if ref is not None:
        ax.plot([ref["expected_uj"]], [100 * ref["accuracy"]], "*", ms=14, color="k", label="FP32 ResNet-32")
    for r in main_rows(dataset, results_dir):  # trained outside the sweep (results/<dataset>.json)
        ax.plot([r["expected_uj"]], [100 * r["accuracy"]], "D" if r["point"] == "paper threshold" else "d",
                mfc="none", ms=8, color="tab:red", label=f"main 20E binary, long schedule, {r['point']}")
    if not rows:
        ax.text(0.5, 0.3, "no sweep rows yet", transform=ax.transAxes, ha="center", color="gray")
    kinds = {r.get("without_exit") for r in rows if r["point"] == "without exit"} - {None}
    ax.set_title(f"{FIGURE_DATASETS[dataset]['label']}: accuracy vs energy (without exit = {', '.join(sorted(kinds)) or 'n/a'})",
                 fontsize=9)
    ax.set_xlabel("expected computational energy per test image (uJ, Table I constants)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(fontsize=7, ncol=2 if len(handles) > 6 else 1, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fig5(rows: list[dict], path: Path) -> None:
    """CIFAR-100: exit percentage and accuracy vs edge layers, one line per bit width (paper threshold 1.0); the
    global-pool exit head at 24E as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(rows)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    for bits, colour in zip(BITS, ("tab:blue", "tab:orange", "tab:green")):
        pts = _curve(idx, bits, "paper threshold")
        if pts:
            a1.plot([L for L, _ in pts], [100 * r["edge_fraction"] for _, r in pts], "-o", color=colour, label=f"{bits}-bit")
            a2.plot([L for L, _ in pts], [100 * r["accuracy"] for _, r in pts], "-o", color=colour, label=f"{bits}-bit")
        g = idx.get((f"e24-b{bits}-x24-joint-global", "paper threshold"))
        if g is not None:
            a1.plot([24], [100 * g["edge_fraction"]], "o", mfc="none", ms=10, color=colour, label=f"{bits}-bit, global pool")
            a2.plot([24], [100 * g["accuracy"]], "o", mfc="none", ms=10, color=colour, label=f"{bits}-bit, global pool")
    for ax, lab in ((a1, "samples exiting at the edge (%)"), (a2, "test accuracy (%)")):
        ax.set_xlabel("edge layers")
        ax.set_ylabel(lab)
        ax.set_xticks(LAYERS)
        ax.grid(alpha=0.3)
        if not rows:
            ax.text(0.5, 0.5, "no sweep rows yet", transform=ax.transAxes, ha="center", color="gray")
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("CIFAR-100, ResNet-32, one exit at the end of the edge, paper threshold 1.0", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _md(rows: list[list], headers: list[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def table3_md(t3: list[dict]) -> str:
    body = [[f"{r['edge_layers']}E + {30 - r['edge_layers']}C", r["edge_bits"], f"{r['edge_mj']:.1f}", r["paper_edge_mj"],
             f"{r['cloud_mj_no_exit']:.1f}", _fmt(r["cloud_mj_measured"]), _pct(r["exit_fraction"]), r["paper_cloud_mj"]]
            for r in t3]
    return _md(body, ["config", "bits", "edge (ours)", "edge (paper)", "cloud, none exit (ours)",
                      "cloud at measured exits (ours)", "exit % (ours, thr 1.0)", "cloud (paper)"])


def _t2_line(dataset, mode, row, source):
    paper = PAPER_TABLE2[dataset][mode]
    if row is None:
        return [dataset, mode, source, "missing", paper[0], "missing", paper[1]]
    return [dataset, mode, source, _pct(row["edge_fraction"]), paper[0], _pct(row["accuracy"]), paper[1]]


def table2_md(stores: dict, bench_c10: dict) -> str:
    """16E+14C binary, exit at 16, paper threshold: joint vs separate; the sweep's rows and, for CIFAR-10, the
    committed benchmark rows (results/cifar10.json, 20-epoch runs) that are the current figures."""
    body = []
    bench = {(r["checkpoint"].rsplit("/", 1)[-1], r["point"]): r for r in bench_c10.get("points", [])}
    for dataset in FIGURE_DATASETS:
        idx = _index(stores.get(dataset, []))
        for mode in ("joint", "separate"):
            body.append(_t2_line(dataset, mode, idx.get((f"e16-b1-x16-{mode}-k3", "paper threshold")), "sweep"))
            for name in ([f"c10-r32-e16-b1-x16-{mode}"] + (["c10-r32-e16-b1-x16-separate-6exitep"] if mode == "separate"
                                                           else [])) if dataset == "cifar10" else []:
                body.append(_t2_line(dataset, mode, bench.get((name, "paper threshold")), f"results/cifar10.json: {name}"))
    return _md(body, ["dataset", "mode", "source", "exit % (ours)", "exit % (paper)", "accuracy % (ours)",
                      "accuracy % (paper)"])


def table4_md(c10_rows: list[dict]) -> str:
    idx = _index(c10_rows)
    body = []
    for (label, (p_exits, p_acc, p_mj)), name in zip(PAPER_TABLE4.items(), ("e20-b1-x20-joint-k3", "e20-b1-x10_20-joint-k3")):
        for kind in ("paper threshold", "calibrated"):
            r = idx.get((name, kind))
            ours = ["missing"] * 3 if r is None else [", ".join(_pct(f) for f in r["exit_fraction"]),
                                                       _pct(r["accuracy"]), f"{10 * r['expected_uj']:.0f}"]
            body.append([label, kind, ours[0], ", ".join(map(str, p_exits)), ours[1], p_acc, ours[2], p_mj])
    return _md(body, ["CIFAR-10 20E+10C binary", "thresholds", "exit % per exit (ours)", "(paper)", "accuracy % (ours)",
                      "(paper)", "energy mJ / 10k (ours)", "(paper)"])


def statements_md(stores: dict, refs: dict) -> str:
    body = []
    for dataset, name, kind, text in PAPER_STATEMENTS:
        r = _index(stores.get(dataset, [])).get((name, kind))
        ref = refs.get(dataset)
        drop = None if r is None or ref is None else 100 * (r["accuracy"] - ref["accuracy"])
        body.append([FIGURE_DATASETS[dataset]["label"], text, f"{name} ({kind})",
                     _fmt(None if r is None else r["reduction"], ".2f", "x"), _fmt(drop, "+.1f", " pt"),
                     _pct(None if r is None else r["edge_fraction"]), _pct(None if r is None else r["accuracy"])])
    return _md(body, ["dataset", "the paper (Sec. III, Fig. 4)", "our row", "reduction", "accuracy vs FP32",
                      "exit %", "accuracy %"])


def arithmetic(row: dict) -> str:
    """What a row was evaluated in: rows say so since evaluation is IEEE FP32 everywhere; older rows evaluated on
    CUDA ran in PyTorch's default TF32 for convolutions."""
    return row.get("arithmetic") or ("tf32" if str(row.get("device") or "").startswith("cuda") else "ieee fp32")


def tf32_note(names: list[str], rows: list[dict]) -> str:
    """A line naming the points whose rows were evaluated in TF32, if any."""
    tf32 = [n for n in names if any(r["name"] == n and arithmetic(r) == "tf32" for r in rows)]
    if not tf32:
        return ""
    return (f"\n\n{len(tf32)} of these points were calibrated and evaluated on a GPU in TF32 (PyTorch's default for "
            "CUDA convolutions) before evaluation was made IEEE FP32 on every device: " + ", ".join(tf32) + ". On "
            "the CPU the validation figures of the two checkpoints measured so differ by up to half a point (results/tf32.json, "
            "where emulating TF32 on the CPU reproduces the GPU's figures); `hybridexit sweep SPEC --reevaluate` "
            "measures them again.")


def tf32_md(bench: dict) -> str:
    """results/tf32.json (benchmarks/tf32.py) as a table: each checkpoint on validation, GPU vs CPU arithmetic."""
    def p2(v):
        return "-" if v is None else f"{100 * v:.2f}"

    def cells(m):
        return " / ".join([p2(m["accuracy"]), ", ".join(p2(e) for e in m["exit_fraction"]),
                           ", ".join(p2(e) for e in m["exit_accuracy"]), p2(m["final_accuracy"])])
    body = []
    for r in bench["rows"]:
        cal, log = r["gpu"].get("sweep_calibration"), r["gpu"].get("training_log_last_epoch")
        *exits, final = log["val_acc (exits, final)"] if log else [None]
        sources = " and ".join(x for x, have in (("calibration", cal), ("training log", log)) if have)
        gpu = (" / ".join([p2(cal["accuracy"] if cal else None), "-", ", ".join(p2(e) for e in exits) or "-",
                           p2(cal["cloud_accuracy"] if cal else final)]) + f" (its {sources})") if sources else "missing"
        body.append([r["checkpoint"], gpu, cells(r["cpu fp32"]), cells(r["cpu fp32 + 1e-7 noise"]),
                     cells(r["cpu tf32 emulated"])])
    return ("### Arithmetic: the same checkpoints in TF32 (a GPU's default) and in FP32\n\n"
            "Validation split at each checkpoint's calibrated thresholds: accuracy % / exit % / exit head's own "
            f"accuracy % / final classifier % (`{bench['command']}`, torch {bench['torch']}).\n\n"
            + _md(body, ["checkpoint", "GPU (measured there)", "CPU, FP32", "CPU, FP32 + 1e-7 noise",
                         "CPU, TF32 emulated"]))


def points_md(names: list[str], rows: list[dict]) -> str:
    """Every grid point of a sweep file: its budget and its three figures, or 'missing'."""
    idx = _index(rows)
    body = []
    for name in names:
        rs = [idx.get((name, k)) for k in ("calibrated", "paper threshold", "without exit")]
        any_row = next((r for r in rs if r is not None), None)
        if any_row is None:
            body.append([name, "missing"] + [""] * 5)
            continue
        budget = f"{any_row['epochs']} ep, {any_row['train_minutes']:.0f} min, {any_row['device']}"
        cells = [("" if r is None else f"{_pct(r['accuracy'])} % / {_pct(r['edge_fraction'])} % / {r['reduction']:.2f}x")
                 for r in rs]
        body.append([name, budget, *cells, ", ".join(f"{t:.3g}" for t in (rs[0] or {}).get("thresholds", [])),
                     any_row.get("adopted_from") or ""])
    return _md(body, ["point", "budget (epochs, train min, device)", "calibrated: acc / exit / reduction",
                      "paper threshold", "without exit", "calibrated thresholds", "adopted from"])


def _spec_names(path) -> list[str]:
    from .sweep import load_sweep

    try:
        return [p.name for p in load_sweep(path).points]
    except Exception:  # noqa: BLE001 - a sweep file that does not load (recipe moved) lists its rows only
        return []


class ReportError(HybridExitError):
    """The report would be generated from no results, or would replace a generated section with an emptier one."""


@dataclass
class Report:
    """The sweeps' report: its markdown ``section`` (figure links relative to the folder it was built for) and what
    ``write_artifacts`` writes into ``results_dir`` (the figures and Table III's JSON)."""

    section: str
    results_dir: Path
    tag: str
    stores: dict
    t3: list

    def write_artifacts(self) -> list[str]:
        """Fig. 4 per dataset, Fig. 5 and ``table3-energy.json`` into the results folder; returns their paths."""
        written = []
        for d, info in FIGURE_DATASETS.items():
            p = self.results_dir / f"{info['fig']}-{d}{self.tag}.png"
            plot_fig4(d, self.stores[d], self.results_dir, p)
            written.append(str(p))
        p = self.results_dir / f"fig5-cifar100{self.tag}.png"
        plot_fig5(self.stores["cifar100"], p)
        written.append(str(p))
        p = self.results_dir / f"table3-energy{self.tag}.json"
        p.write_text(json.dumps({"unit": "mJ per 10,000 images", "network": "ResNet-32, CIFAR-100, one exit at the edge",
                                 "rows": self.t3}, indent=1) + "\n")
        written.append(str(p))
        return written


def build_report(results_dir="results", links_from=".", sweeps=PAPER_SWEEPS, epochs: int | None = None) -> Report:
    """The report of the sweep stores in ``results_dir`` (``epochs``: those of a schedule override, ``sweep --epochs
    N``: ``sweep-<dataset>-epN.json``), its figure links relative to the folder ``links_from``. Reads only; refuses
    (``ReportError``) a results folder with no sweep store."""
    results_dir, tag = Path(results_dir), "" if epochs is None else f"-ep{epochs}"
    want = [results_dir / f"sweep-{d}{tag}.json" for d in FIGURE_DATASETS]
    if not results_dir.is_dir() or not any(f.is_file() for f in want):
        raise ReportError(f"no sweep results in {results_dir} ({' or '.join(f.name for f in want)}, written by "
                          f"`hybridexit sweep`): give --results-dir the folder that holds them; nothing written")
    stores = {d: load_rows(results_dir / f"sweep-{d}{tag}.json") for d in FIGURE_DATASETS}
    found = {d: reference_point(d, stores[d], results_dir) for d in FIGURE_DATASETS}
    refs, refs_src = {d: f[0] for d, f in found.items()}, {d: f[1] for d, f in found.items()}
    t3 = table3_rows(100, stores["cifar100"])
    bench = load_rows(results_dir / "cifar10.json")
    names = {Path(s).stem.replace("paper-", ""): _spec_names(s) for s in sweeps}
    rdir, img = results_dir.as_posix(), Path(os.path.relpath(results_dir, links_from)).as_posix()
    section = render_section(stores, refs, refs_src, t3, bench if isinstance(bench, dict) else {}, names, tag, rdir, img)
    if not tag:
        section += schedules_md(results_dir, stores, rdir) + long_schedule_md(results_dir, rdir)
    tf32 = results_dir / "tf32.json"
    if tf32.exists():
        section += "\n\n" + tf32_md(json.loads(tf32.read_text()))
    return Report(section, results_dir, tag, stores, t3)


def check_not_emptier(before: str, section: str, where, results_dir, force: bool = False) -> None:
    """Refuses (``ReportError``) to replace ``before``, a report with tables, by a ``section`` with more cells marked
    "missing" (the rows of a mistyped results folder would erase results), unless ``force``."""
    old, new = before.count("missing"), section.count("missing")
    if "\n|" in before and new > old and not force:  # (a text without tables was never generated from rows)
        raise ReportError(f"the rows in {results_dir} would leave {new} cells of {where} missing where it now has {old}: "
                          f"check --results-dir (and --epochs), or pass --force to replace them; nothing written")


def write_report(results_dir="results", out=None, sweeps=PAPER_SWEEPS, epochs: int | None = None,
                 force: bool = False) -> list[str]:
    """``hybridexit report``: the figures and Table III's JSON into ``results_dir``, and the report as a markdown
    file of its own, ``out`` (default ``results_dir/report[-epN].md``); returns the paths written. Refuses
    (``ReportError``, nothing written) what ``build_report`` refuses, and replacing an ``out`` that holds more
    results (``check_not_emptier``) unless ``force``."""
    tag = "" if epochs is None else f"-ep{epochs}"
    out = Path(out) if out is not None else Path(results_dir) / f"report{tag}.md"
    report = build_report(results_dir, out.parent, sweeps, epochs)
    check_not_emptier(out.read_text() if out.is_file() else "", report.section, out, results_dir, force)
    written = report.write_artifacts()
    out.write_text(f"# Design-space sweeps: figures and tables\n\n{report.section}\n")
    return [*written, str(out)]


def schedules_md(results_dir: Path, grids: dict, rdir: str = "results") -> str:
    """The points trained again on a longer schedule (``sweep --epochs N`` stores), each table beside the grid's rows
    (``grids``: dataset -> rows, as loaded by ``build_report``) of the same points, and a schedule choice recorded on
    validation (``*-selection.json`` with ``candidates``, benchmarks/schedule_select.py)."""
    parts = []
    for d, info in FIGURE_DATASETS.items():
        grid = grids[d]
        for store in sorted(results_dir.glob(f"sweep-{d}-ep*.json")):
            rows = load_rows(store)
            names = sorted({r["name"] for r in rows} - {"fp32"})
            parts.append(f"{info['label']}, {rdir}/{store.name}:\n\n" + points_md(names, rows)
                         + f"\n\nThe same points in the grid ({rdir}/sweep-{d}.json):\n\n" + points_md(names, grid))
    for sel in sorted(results_dir.glob("*-selection.json")):
        data = json.loads(sel.read_text())
        if "candidates" not in data:  # a selection of another kind
            continue
        body = [[c["checkpoint"], c["epochs"], ", ".join(f"{t:.3g}" for t in c["thresholds"]), _pct(c["val_accuracy"]),
                 _pct(c["val_edge_fraction"]), f"{c['val_reduction']:.2f}x",
                 "chosen" if c["checkpoint"] == data["chosen"] else ""] for c in data["candidates"]]
        parts.append(f"Schedule chosen on validation ({rdir}/{sel.name}; rule: {data['rule']}):\n\n"
                     + _md(body, ["checkpoint", "epochs", "thresholds", "val accuracy %", "val exit %", "val reduction",
                                  ""]))
    return "\n\n### Longer training schedules\n\n" + "\n\n".join(parts) + "\n" if parts else ""


def render_section(stores: dict, refs: dict, refs_src: dict, t3: list[dict], bench_c10: dict, names: dict,
                   tag: str = "", rdir: str = "results", img: str = "../results") -> str:
    """The generated section; ``rdir``: the results folder as the text names it, ``img``: the same folder as the
    figures' links see it from the doc's folder."""
    parts = []
    for d, info in FIGURE_DATASETS.items():
        ref = refs[d]
        grid = names.get(d) or sorted({r['name'] for r in stores[d] if r['name'] != 'fp32'})
        fp32 = "missing" if ref is None else f"{100 * ref['accuracy']:.2f} % test accuracy, {ref['expected_uj']:.1f} uJ per image"
        parts.append(f"### {info['label']}: the grid ({len(stores[d])} rows in {rdir}/sweep-{d}{tag}.json)\n\n"
                     f"FP32 reference ({refs_src[d]}): {fp32}.\n\n"
                     + points_md(grid, stores[d]) + tf32_note(grid, stores[d])
                     + f"\n\n![Fig. 4 {info['label']}]({img}/{info['fig']}-{d}{tag}.png)\n")
    parts.append(f"### Fig. 5 (CIFAR-100: exits and accuracy vs edge layers)\n\n![Fig. 5]({img}/fig5-cifar100{tag}.png)\n")
    parts.append("### What the paper states about Fig. 4 and Fig. 5, beside our rows\n\n" + statements_md(stores, refs))
    parts.append("### Table II: 16E+14C binary, joint vs separate optimization (paper threshold)\n\n"
                 + table2_md(stores, bench_c10))
    parts.append("### Table III: energy at the edge and on the cloud, mJ per 10,000 images (CIFAR-100, one exit)\n\n"
                 "Ours from the energy model (conv and linear MACs at their bit width, adds; the exit head counted at "
                 "the edge), so it needs no training; 'cloud at measured exits' weights the cloud by the share of "
                 "test images that do not exit in the CIFAR-100 sweep row at the paper threshold.\n\n" + table3_md(t3))
    parts.append("### Table IV: CIFAR-10 20E+10C binary, one exit vs two\n\n" + table4_md(stores.get("cifar10", [])))
    return "\n\n".join(parts)


# ---- issue 41: the long-schedule stores beside the paper and the short schedule ------------------------------------

LONG_STORES = (("long", "200 epochs, today's binary training"), ("long-plain", "200 epochs, the paper's recipe"))
OFF_POINTS = 1.0  # a cell further than this from the paper's value is marked


def _paper_cells() -> list[tuple]:
    """(dataset, cell, point name, row kind, paper accuracy % or None, paper drop vs FP32 in points or None, paper
    exit % per exit or None): the cells of Tables II and IV and the Fig. 4 / Fig. 5 statements that give a number."""
    cells = []
    for d, modes in PAPER_TABLE2.items():
        for mode, (exit_pct, acc) in modes.items():
            cells.append((d, f"Table II, 16E binary, {mode}", f"e16-b1-x16-{mode}-k3", "paper threshold", acc, None,
                          [exit_pct]))
    for (label, (exits, acc, _)), name in zip(PAPER_TABLE4.items(), ("e20-b1-x20-joint-k3", "e20-b1-x10_20-joint-k3")):
        cells.append(("cifar10", f"Table IV, 20E binary, {label}", name, "paper threshold", acc, None, exits))
    drops = {("cifar10", "e10-b1-x10-joint-k3", "without exit"): -1.5, ("cifar100", "e10-b1-x10-joint-k3", "without exit"): -2.1,
             ("cifar100", "e24-b4-x24-joint-k3", "paper threshold"): -1.4,
             ("cifar100", "e24-b2-x24-joint-k3", "paper threshold"): -3.0}
    for (d, name, kind), drop in drops.items():
        text = next(t for dd, n, k, t in PAPER_STATEMENTS if (dd, n, k) == (d, name, kind))
        cells.append((d, f"Fig. 4: {text}", name, kind, None, drop, None))
    return cells


def _long_cell(row: dict | None, ref: dict | None, paper_acc, paper_drop) -> tuple[str, float | None]:
    """(the cell's text, its distance from the paper in points or None)."""
    if row is None:
        return "missing", None
    acc = 100 * row["accuracy"]
    exits = ", ".join(_pct(f) for f in row["exit_fraction"])
    if paper_acc is not None:
        off = acc - paper_acc
    elif ref is not None:
        off = (acc - 100 * ref["accuracy"]) - paper_drop
    else:
        return f"{acc:.2f} (no FP32 row)", None
    mark = " ✗" if abs(off) > OFF_POINTS else ""
    return f"{acc:.2f} ({off:+.2f}){mark}" + (f", exit {exits}" if exits else ""), off


def long_schedule_md(results_dir: Path, rdir: str = "results") -> str:
    """Each paper cell beside the paper's value, the short schedule's row (``sweep-<dataset>.json``) and the long
    stores' (``sweep-<dataset>-long.json``, ``-long-plain.json``), marking (✗) a cell more than OFF_POINTS from the
    paper; the accuracy's distance from the paper in brackets (for a drop vs FP32: the drop's distance). Empty when
    no long store exists."""
    stores = {(d, s): load_rows(results_dir / f"sweep-{d}{'' if s == 'short' else '-' + s}.json")
              for d in FIGURE_DATASETS for s in ("short", *(k for k, _ in LONG_STORES))}
    if not any(stores[(d, k)] for d in FIGURE_DATASETS for k, _ in LONG_STORES):
        return ""
    body, far = [], []
    for d, cell, name, kind, p_acc, p_drop, p_exits in _paper_cells():
        paper = f"{p_acc:.2f}" if p_acc is not None else f"{p_drop:+.1f} pt vs FP32"
        if p_exits:
            paper += ", exit " + ", ".join(f"{e:.1f}" for e in p_exits)
        line = [FIGURE_DATASETS[d]["label"], cell, paper]
        for s in ("short", *(k for k, _ in LONG_STORES)):
            idx = _index(stores[(d, s)])
            text, off = _long_cell(idx.get((name, kind)), idx.get(("fp32", "reference")), p_acc, p_drop)
            line.append(text)
            if s != "short" and off is not None and abs(off) > OFF_POINTS:
                far.append(f"{FIGURE_DATASETS[d]['label']} {cell} ({s}: {off:+.2f} pt)")
        body.append(line)
    heads = ["dataset", "cell", "paper (accuracy %, exit %)", "short schedule (sweep-<dataset>.json)",
             *(f"{label} (sweep-<dataset>-{k}.json)" for k, label in LONG_STORES)]
    tail = ("Cells more than 1 point from the paper (✗): " + "; ".join(far) + "." if far else
            "Every long-schedule cell present is within 1 point of the paper.")
    return (f"\n\n### The paper's cells on the paper's schedule (issue 41; {rdir}/sweep-*-long*.json)\n\n"
            "Accuracy % at the paper's threshold (or the final classifier's for 'no exit'), its distance from the "
            "paper in brackets (for a drop vs FP32, the drop's distance), and the exit fractions.\n\n"
            + _md(body, heads) + "\n\n" + tail + "\n")
