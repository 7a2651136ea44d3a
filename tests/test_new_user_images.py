"""Image folders as a new user brings them (issue 35, items 1 and 7): every file accounted for, none answered
unless it was read, deep and palette formats read right."""

import json

import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoint
from PIL import Image

from hybridexit.cli import main
from hybridexit.data import image_extensions, inputs_from_folder, load_image_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _rgb(seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """class0/: a good PNG, a corrupt PNG, a zero-byte PNG, a truncated JPEG; class1/: a 16-bit grey PNG and a GIF;
    plus two files that are not images."""
    c0, c1 = tmp_path / "imgs" / "class0", tmp_path / "imgs" / "class1"
    c0.mkdir(parents=True)
    c1.mkdir(parents=True)
    Image.fromarray(_rgb(0)).save(c0 / "a_good.png")
    (c0 / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (c0 / "c_empty.png").write_bytes(b"")
    Image.fromarray(_rgb(1, 64)).save(c0 / "d_cut.jpg", quality=95)
    jpg = (c0 / "d_cut.jpg").read_bytes()
    (c0 / "d_cut.jpg").write_bytes(jpg[: len(jpg) // 3])
    Image.fromarray(np.full((32, 32), 32896, dtype=np.uint16)).save(c1 / "e_deep.png")  # 16 bits: 32896 / 257 = 128
    Image.fromarray(_rgb(2)).convert("P").save(c1 / "f_palette.gif")
    (c1 / "notes.txt").write_text("not an image\n")
    (tmp_path / "imgs" / "README").write_text("labels by folder\n")
    return tmp_path / "imgs"


def test_sixteen_bit_and_gif_are_read_right(folder):
    deep = load_image_files([folder / "class1" / "e_deep.png"])[0]
    assert deep.dtype == torch.uint8 and int(deep.min()) == int(deep.max()) == 128  # not saturated to 255
    gif = load_image_files([folder / "class1" / "f_palette.gif"])[0]
    want = np.asarray(Image.open(folder / "class1" / "f_palette.gif").convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(gif.numpy(), want)
    assert {".gif", ".tif", ".tiff", ".png", ".jpg", ".webp"} <= set(image_extensions())


def test_folder_accounts_for_every_file(folder):
    inp = inputs_from_folder(folder, [f"class{i}" for i in range(10)])
    assert inp.paths == ["class0/a_good.png", "class0/b_corrupt.png", "class0/c_empty.png", "class0/d_cut.jpg",
                         "class1/e_deep.png", "class1/f_palette.gif"]
    assert sorted(inp.errors) == [1, 2, 3] and inp.readable == [0, 4, 5]
    assert inp.skipped == ["README", "class1/notes.txt"]


def test_evaluate_gives_one_record_per_input_and_leaves_the_unreadable_out(folder, tmp_path, capsys):
    ck = write_tiny_checkpoint(tmp_path / "ck")
    out = tmp_path / "r.jsonl"
    assert main(["evaluate", str(ck), "--images", str(folder), "--out", str(out), "--json", "--engine", "torch"]) == 0
    s = json.loads(capsys.readouterr().out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(6))
    assert [r["decided_at"] == "unreadable" for r in recs] == [False, True, True, True, False, False]
    bad = [r for r in recs if r["decided_at"] == "unreadable"]
    assert all(r["prediction"] is None and "not a readable image" in r["error"] for r in bad)
    assert [r["path"] for r in bad] == ["class0/b_corrupt.png", "class0/c_empty.png", "class0/d_cut.jpg"]
    assert [r["label"] for r in recs] == [0, 0, 0, 0, 1, 1]
    good = [r for r in recs if r["decided_at"] != "unreadable"]
    assert s["n"] == 3 and s["inputs"] == 6 and s["unreadable_inputs"] == 3 and s["skipped_files"] == 2
    assert s["accuracy"] == sum(r["prediction"] == r["label"] for r in good) / 3
    exited = sum(r["decided_at"].startswith("exit:") for r in good)
    assert s["edge_fraction"] == exited / 3
    assert [u["path"] for u in s["unreadable"]] == [r["path"] for r in bad]
    # the table: the long keys are padded, every value after its key, the reasons said
    assert main(["evaluate", str(ck), "--images", str(folder), "--engine", "torch"]) == 0
    table = capsys.readouterr().out
    rows = dict(line.split(None, 1) for line in table.splitlines())
    assert rows["unreadable_inputs"].strip() == "3" and rows["skipped_files"].strip() == "2"
    assert "c_empty.png: not a readable image" in rows["unreadable"]


def test_evaluate_on_a_folder_of_unreadable_files_is_one_line(tmp_path, capsys):
    ck = write_tiny_checkpoint(tmp_path / "ck")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"")
    assert main(["evaluate", str(ck), "--images", str(tmp_path / "imgs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the 1 images" in err
