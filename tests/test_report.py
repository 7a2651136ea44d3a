"""The sweep report: Table III from the energy model, figures and tables from result rows, missing points shown as
missing, the docs' hand-written text kept around the generated section (scripts/render_sweep_doc.py, the one doc
splicer scripts/splice.py)."""

import json
import sys
from pathlib import Path

import pytest

from hybridexit.data import DATASETS
from hybridexit.model.energy import energy_report
from hybridexit.model.resnet import HybridConfig
from hybridexit.workflows.report import PAPER_TABLE3, table3_rows, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from render_sweep_doc import BEGIN, END, render  # noqa: E402

C100 = DATASETS["cifar100"]


def c100_cfg(layers, bits, exits=None, pool="k3"):
    return HybridConfig(depth=32, num_classes=100, edge_layers=layers, edge_bits=bits,
                        exits=(layers,) if exits is None else exits, exit_pool=pool, mean=C100["mean"], std=C100["std"])


def rows_for(layers, bits, exit_fraction, accuracy, final_accuracy, pool="k3"):
    """The three rows a sweep writes for one point, figures made up for the test, energies from the model."""
    rep, bare = energy_report(c100_cfg(layers, bits, pool=pool)), energy_report(c100_cfg(layers, bits, exits=()))
    base = {"name": f"e{layers}-b{bits}-x{layers}-joint-{pool}", "dataset": "cifar100", "edge_layers": layers,
            "edge_bits": bits, "exits": [layers], "mode": "joint", "exit_pool": pool, "epochs": 12,
            "train_minutes": 90.0, "device": "cpu", "adopted_from": None, "fp32_uj": rep.fp32_uj}
    exp = rep.expected_uj([exit_fraction])
    with_exit = dict(base, exit_fraction=[exit_fraction], edge_fraction=exit_fraction, accuracy=accuracy,
                     edge_uj=rep.edge_uj, cloud_uj=rep.cloud_uj, expected_uj=exp, reduction=rep.fp32_uj / exp)
    total = bare.edge_uj + bare.cloud_uj
    return [dict(with_exit, point="calibrated", thresholds=[0.8]), dict(with_exit, point="paper threshold", thresholds=[1.0]),
            dict(base, point="without exit", thresholds=[], exit_fraction=[], edge_fraction=0.0, accuracy=final_accuracy,
                 edge_uj=bare.edge_uj, cloud_uj=bare.cloud_uj, expected_uj=total, reduction=rep.fp32_uj / total,
                 without_exit="exits off")]


def test_table3_is_the_energy_model_beside_the_paper():
    rows = rows_for(24, 4, 0.55, 0.66, 0.67)
    t3 = table3_rows(100, rows)
    assert [(r["edge_layers"], r["edge_bits"]) for r in t3] == list(PAPER_TABLE3)
    by = {(r["edge_layers"], r["edge_bits"]): r for r in t3}
    for cell in ((20, 1), (24, 4)):
        rep = energy_report(c100_cfg(*cell))
        assert by[cell]["edge_mj"] == 10 * rep.edge_uj and by[cell]["cloud_mj_no_exit"] == 10 * rep.cloud_uj
    for r in t3:
        assert (r["paper_edge_mj"], r["paper_cloud_mj"]) == PAPER_TABLE3[(r["edge_layers"], r["edge_bits"])]
        if (r["edge_layers"], r["edge_bits"]) != (24, 4):
            assert r["cloud_mj_measured"] is None and r["exit_fraction"] is None  # no row: missing, not invented
    assert by[(24, 1)]["cloud_mj_no_exit"] < by[(10, 1)]["cloud_mj_no_exit"]  # fewer cloud layers, less cloud energy
    assert by[(20, 1)]["edge_mj"] < by[(20, 2)]["edge_mj"] < by[(20, 4)]["edge_mj"]  # k-bit MAC = k x binary MAC
    assert by[(24, 4)]["exit_fraction"] == 0.55
    assert by[(24, 4)]["cloud_mj_measured"] == pytest.approx(10 * rows[1]["cloud_uj"] * 0.45)


def test_report_writes_figures_and_keeps_hand_written_docs(tmp_path):
    rows = rows_for(24, 4, 0.55, 0.66, 0.67) + rows_for(16, 1, 0.2, 0.6, 0.62) + rows_for(24, 1, 0.1, 0.55, 0.6, "global")
    rows.append({"name": "fp32", "point": "reference", "accuracy": 0.673, "expected_uj": rows[0]["fp32_uj"]})
    (tmp_path / "sweep-cifar100.json").write_text(json.dumps(rows))
    docs = tmp_path / "sweep.md"
    docs.write_text(f"# Sweeps\n\nhand-written intro\n\n{BEGIN}\nold generated text\n{END}\n\nhand-written outro\n")
    written = render(results_dir=tmp_path, docs=docs)
    text = docs.read_text()
    assert "hand-written intro" in text and "hand-written outro" in text and "old generated text" not in text
    for name in ("fig4a-cifar10.png", "fig4b-cifar100.png", "fig5-cifar100.png"):
        assert str(tmp_path / name) in written and (tmp_path / name).stat().st_size > 5000
    t3 = json.loads((tmp_path / "table3-energy.json").read_text())["rows"]
    assert len(t3) == 12 and next(r for r in t3 if (r["edge_layers"], r["edge_bits"]) == (24, 4))["exit_fraction"] == 0.55
    section = text.split(BEGIN)[1].split(END)[0]
    line = next(r for r in section.splitlines() if r.startswith("| e24-b4-x24-joint-k3"))
    assert "55.0 % / " in line and "12 ep, 90 min, cpu" in line
    assert next(r for r in section.splitlines() if r.startswith("| e10-b2-x10-joint-k3")).split("|")[2].strip() == "missing"
    assert "| 2269 " in section and "| 88.61 " in section and "| 52.8 " in section  # the paper's values beside ours
    assert "24E+6C 4-bit, exit at 24" in section and "-1.3 pt" in section  # 66.0 % vs the FP32 row's 67.3 %
    render(results_dir=tmp_path, docs=docs)
    assert docs.read_text() == text  # regenerating from the same rows changes nothing
    out = tmp_path / "own.md"  # hybridexit report: the same section as a file of its own, nothing spliced
    assert write_report(results_dir=tmp_path, out=out)[-1] == str(out)
    assert section.strip() in out.read_text() and BEGIN not in out.read_text()


def test_report_sets_a_longer_schedule_beside_the_grid_and_names_the_validation_choice(tmp_path):
    (tmp_path / "sweep-cifar100.json").write_text(json.dumps(rows_for(24, 4, 0.55, 0.66, 0.67)))
    long = [dict(r, epochs=30, checkpoint="checkpoints/long") for r in rows_for(24, 4, 0.75, 0.67, 0.68)]
    (tmp_path / "sweep-cifar100-ep30.json").write_text(json.dumps(long))
    cand = {"epochs": 12, "thresholds": [0.98], "val_accuracy": 0.675, "val_edge_fraction": 0.58, "val_reduction": 4.3}
    (tmp_path / "c100-headline-selection.json").write_text(json.dumps({
        "rule": "largest reduction", "chosen": "checkpoints/long", "candidates": [
            dict(cand, checkpoint="checkpoints/short"),
            dict(cand, checkpoint="checkpoints/long", epochs=30, val_edge_fraction=0.78, val_reduction=5.3)]}))
    written = write_report(results_dir=tmp_path)
    assert written[-1] == str(tmp_path / "report.md")
    part = (tmp_path / "report.md").read_text().split("### Longer training schedules")[1]
    lines = [r for r in part.splitlines() if r.startswith("| e24-b4-x24-joint-k3")]
    assert "30 ep" in lines[0] and "75.0 % / " in lines[0] and "12 ep" in lines[1] and "55.0 % / " in lines[1]
    chosen = next(r for r in part.splitlines() if r.startswith("| checkpoints/long"))
    assert "78.0" in chosen and chosen.rstrip(" |").endswith("chosen")
    assert "chosen" not in next(r for r in part.splitlines() if r.startswith("| checkpoints/short"))


def test_the_one_doc_splicer_keeps_every_byte_around_the_section():
    from splice import SpliceError, between, splice

    text = "intro\r\n  <!-- x:begin (note) -->\nold\n<!-- x:end -->\ttail \n"
    new = splice(text, "<!-- x:begin (note) -->", "<!-- x:end -->", "a | b\n")
    assert new == "intro\r\n  <!-- x:begin (note) -->\na | b\n<!-- x:end -->\ttail \n"
    assert splice(text, "<!-- x:begin (note) -->", "<!-- x:end -->", "a | b") == new  # the end marker on its own line
    assert between(new, "<!-- x:begin (note) -->", "<!-- x:end -->") == "\na | b\n"
    for begin, end in (("<!-- y:begin -->", "<!-- x:end -->"), ("<!-- x:end -->", "<!-- x:begin (note) -->")):
        with pytest.raises(SpliceError, match="add the two markers"):
            splice(text, begin, end, "z")
