"""`hybridexit report` never erases generated results by mistake (issue 35, item 2)."""

import json

import pytest
from test_report import rows_for

from hybridexit.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: the energy model's forward passes


def _store(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep-cifar100.json").write_text(json.dumps(rows))
    return folder


def test_report_refuses_an_empty_results_folder_and_touches_nothing(tmp_path, capsys):
    docs = tmp_path / "sweep.md"
    docs.write_text("# Sweeps\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    before = docs.read_text()
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results-dir", str(tmp_path / "empty"), "--out", str(docs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sweep results in" in err and str(tmp_path / "empty") in err
    assert docs.read_text() == before and list((tmp_path / "empty").iterdir()) == []


def test_report_refuses_a_section_with_fewer_results_unless_forced(tmp_path, capsys, monkeypatch):
    import hybridexit.workflows.report as report

    monkeypatch.setattr(report, "plot_fig4", lambda d, rows, rdir, path: path.write_bytes(b"png"))  # (slow, tested
    monkeypatch.setattr(report, "plot_fig5", lambda rows, path: path.write_bytes(b"png"))  # in test_report.py)
    full = _store(tmp_path / "full", rows_for(24, 4, 0.55, 0.66, 0.67) + rows_for(16, 1, 0.2, 0.6, 0.62))
    part = _store(tmp_path / "part", rows_for(24, 4, 0.55, 0.66, 0.67))
    docs = tmp_path / "docs" / "sweep.md"
    docs.parent.mkdir()
    assert main(["report", "--results-dir", str(full), "--out", str(docs)]) == 0
    capsys.readouterr()
    text = docs.read_text()
    assert f"rows in {full.as_posix()}/sweep-cifar100.json" in text  # the folder it was given, not "results/"
    assert "](../full/fig4b-cifar100.png)" in text  # figure links from the doc's folder
    assert main(["report", "--results-dir", str(part), "--out", str(docs)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and err.count("\n") == 1 and docs.read_text() == text
    assert not (part / "fig4b-cifar100.png").exists()  # nothing written, figures neither
    assert main(["report", "--results-dir", str(part), "--out", str(docs), "--force"]) == 0
    assert docs.read_text() != text and (part / "fig4b-cifar100.png").exists()
