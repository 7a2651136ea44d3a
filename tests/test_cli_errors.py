"""Every subcommand, tried with bad values as a new user would: one line on stderr, exit status 2, no traceback,
and nothing done (no data read, no checkpoint or folder written). Plus: --help shows a help line and the default
of every option, and --version answers."""

import argparse
import json
import os
import subprocess
import sys

import pytest
from conftest import write_tiny_checkpoint

from hybridexit.cli import build_parser, main


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A tiny untrained checkpoint with an exit policy, a file, an empty folder, a garbage PEM, a non-object
    config.json, and a path under a folder that does not exist."""
    root = tmp_path_factory.mktemp("cli")
    ck = write_tiny_checkpoint(root / "ck")
    (root / "file.txt").write_text("not a folder\n")
    (root / "empty").mkdir()
    (root / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (root / "blank-token").write_text("\n")
    notobj = root / "notobj"
    notobj.mkdir()
    (notobj / "config.json").write_text(json.dumps([1, 2, 3]))
    (notobj / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes())
    return {"CK": str(ck), "FILE": str(root / "file.txt"), "EMPTY": str(root / "empty"),
            "MISSING": str(root / "missing"), "OUT_MISSING": str(root / "missing-dir" / "x.jsonl"),
            "PEM": str(root / "garbage.pem"), "BLANK": str(root / "blank-token"), "NOTOBJ": str(notobj)}


# (command line with placeholders, a fragment the one-line message must contain)
CASES = [
    # evaluate
    ("evaluate CK --limit 0", "--limit: 0 is not allowed"),
    ("evaluate CK --limit -5", "--limit: -5 is not allowed"),
    ("evaluate CK --limit ten", "'ten' is not a whole number"),
    ("evaluate CK --batch-size 0", "--batch-size: 0 is not allowed"),
    ("evaluate CK --batch-size -3", "--batch-size: -3 is not allowed"),
    ("evaluate CK --out OUT_MISSING", "does not exist"),
    ("evaluate CK --out EMPTY", "is a folder"),
    ("evaluate CK --thresholds -1", "--thresholds: -1 is not allowed"),
    ("evaluate CK --thresholds nan", "--thresholds: nan is not allowed"),
    ("evaluate CK --thresholds 0.5 0.5", "2 thresholds for 1 exit"),
    ("evaluate CK --data-dir FILE", "is a file, not a folder"),
    ("evaluate CK --data-dir MISSING", "no such folder"),
    ("evaluate CK --split nope", "invalid choice"),
    ("evaluate MISSING", "not a checkpoint"),
    ("evaluate FILE", "not a checkpoint"),
    ("evaluate NOTOBJ", "not a hybridexit checkpoint config"),
    # calibrate
    ("calibrate CK --exit-fraction 1.5", "not a fraction"),
    ("calibrate CK --max-drop -0.1", "not a fraction"),
    ("calibrate CK --min-accuracy nan", "finite"),
    ("calibrate CK", "one of the arguments"),
    ("calibrate CK --exit-fraction 0.5 --plot OUT_MISSING", "does not exist"),
    ("calibrate MISSING --exit-fraction 0.5", "not a checkpoint"),
    # train
    ("train --out MISSING --lr -1", "--lr: -1 is not allowed"),
    ("train --out MISSING --lr nan", "finite"),
    ("train --out MISSING --limit-train 0", "--limit-train: 0 is not allowed"),
    ("train --out MISSING --epochs 0", "nothing to train"),
    ("train --out MISSING --epochs -1", "--epochs: -1 is not allowed"),
    ("train --out MISSING --batch-size 0", "--batch-size: 0 is not allowed"),
    ("train --out MISSING --data-dir MISSING", "no such folder"),
    ("train --out MISSING --data-dir FILE", "is a file, not a folder"),
    ("train --out FILE", "is a file"),
    ("train --out MISSING --kd-alpha 2", "not a fraction"),
    ("train --out MISSING --label-smoothing -0.1", "not a fraction"),
    ("train --out MISSING --depth 0", "--depth: 0 is not allowed"),
    ("train --out MISSING --depth 9", "not a CIFAR ResNet depth"),
    ("train --out MISSING --exit-weights -1", "--exit-weights: -1 is not allowed"),
    ("train --out MISSING --init MISSING", "not a checkpoint"),
    ("train --out MISSING --val-size -1", "--val-size: -1 is not allowed"),
    ("train --out MISSING --edge-bits 3", "unsupported bit width"),
    ("train --out MISSING --mode cloud", "give init"),
    ("train --lr 0.1", "--out"),
    # train-codec, export-codec
    ("train-codec CK --recipe MISSING --out MISSING", "no such file"),
    ("train-codec CK --out MISSING", "--recipe"),
    ("train-codec CK --recipe FILE --out MISSING", "not valid TOML"),
    ("train-codec MISSING --recipe FILE --out MISSING", "not a checkpoint"),
    ("train-codec CK --recipe FILE --out MISSING --data-dir FILE", "is a file, not a folder"),
    ("train-codec CK --recipe FILE --out FILE", "is a file"),
    ("export-codec MISSING --out MISSING", "no such folder"),
    ("export-codec CK --out MISSING", "is not a codec run"),
    ("export-codec EMPTY", "--out"),
    # summary, energy
    ("summary --mac32-pj -1", "--mac32-pj: -1 is not allowed"),
    ("summary --checkpoint MISSING", "not a checkpoint"),
    ("energy --edge-layers 20 --exits 20 --exit-rate 1.5", "not a fraction"),
    ("energy --edge-layers -2", "--edge-layers: -2 is not allowed"),
    ("energy --exits 0", "--exits: 0 is not allowed"),
    ("energy --mem-pj-per-bit inf", "finite"),
    # serve
    ("serve CK --port 99999", "not a TCP port"),
    ("serve CK --port -1", "not a TCP port"),
    ("serve CK --port http", "not a whole number"),
    ("serve CK --max-batch 0", "--max-batch: 0 is not allowed"),
    ("serve CK --max-wait-ms -1", "--max-wait-ms: -1 is not allowed"),
    ("serve CK --request-timeout-s 0", "--request-timeout-s: 0 is not allowed"),
    ("serve CK --max-request-bytes 100", "at least 1024"),
    ("serve CK --token-file MISSING", "no such file"),
    ("serve CK --token-file BLANK", "one token on one line"),
    ("serve CK --token MYSECRET", "--token is not accepted: a command line is visible to every user in ps"),
    ("edge CK --cloud http://127.0.0.1:9 --token MYSECRET", "put the token in a file"),
    ("serve CK --tls-cert MISSING", "no such file"),
    ("serve CK --tls-cert PEM", "cannot use TLS certificate"),
    ("serve CK --tls-key PEM", "--tls-key needs --tls-cert"),
    ("serve CK --host 0.0.0.0", "without a token"),
    ("serve MISSING", "not a checkpoint"),
    # edge
    ("edge CK", "--cloud"),
    ("edge CK --cloud ftp://host", "not a server URL"),
    ("edge CK --cloud 127.0.0.1:8000", "not a server URL"),
    ("edge CK --cloud http://127.0.0.1:9 --limit 0", "--limit: 0 is not allowed"),
    ("edge CK --cloud http://127.0.0.1:9 --batch-size -3", "--batch-size: -3 is not allowed"),
    ("edge CK --cloud http://127.0.0.1:9 --out OUT_MISSING", "does not exist"),
    ("edge CK --cloud http://127.0.0.1:9 --thresholds nan", "--thresholds: nan is not allowed"),
    ("edge CK --cloud http://127.0.0.1:9 --thresholds 1 2", "2 thresholds for 1 exit"),
    ("edge CK --cloud http://127.0.0.1:9 --retries -1", "--retries: -1 is not allowed"),
    ("edge CK --cloud http://127.0.0.1:9 --timeout-s 0", "--timeout-s: 0 is not allowed"),
    ("edge CK --cloud http://127.0.0.1:9 --images MISSING", "no such folder"),
    ("edge CK --cloud http://127.0.0.1:9 --images FILE", "is a file, not a folder"),
    ("edge CK --cloud http://127.0.0.1:9 --images EMPTY", "no images"),
    ("edge CK --cloud http://127.0.0.1:9 --data-dir FILE", "is a file, not a folder"),
    ("edge CK --cloud https://127.0.0.1:9 --ca MISSING", "no such file"),
    ("edge CK --cloud https://127.0.0.1:9 --ca PEM", "cannot use CA certificate"),
    ("edge CK --cloud http://127.0.0.1:9 --token-file BLANK", "one token on one line"),
    ("serve CK --device banana", "not a torch device"),
    ("edge CK --cloud http://[::1 --images EMPTY", "not a server URL"),
    ("edge CK --cloud http://127.0.0.1:99999", "not a server URL"),
    ("edge CK --cloud http://127.0.0.1:9 --device cpu:x", "not a torch device"),
    ("edge CK --cloud http://127.0.0.1:9 --audit-burst-rate 0.5", "--audit-burst-rate needs --audit-rate"),
    ("train --out MISSING --device nonsense", "not a torch device"),
    # sweep, report
    ("sweep MISSING", "no such file"),
    ("sweep FILE --workers 0", "--workers: 0 is not allowed"),
    ("sweep FILE --data-dir FILE", "is a file, not a folder"),
    ("sweep FILE --stop-after-epochs -1", "--stop-after-epochs: -1 is not allowed"),
    ("report --results-dir MISSING", "no such folder"),
    ("report --epochs 0", "--epochs: 0 is not allowed"),
    ("report --out OUT_MISSING", "does not exist"),
    ("report --docs FILE", "scripts/render_sweep_doc.py"),
    # the command itself
    ("", "required: COMMAND"),
    ("nonsense", "invalid choice"),
]


def _argv(line: str, paths: dict) -> list[str]:
    return [paths.get(w, w) for w in line.split()]


@pytest.mark.parametrize("line,fragment", CASES, ids=[c[0] or "(nothing)" for c in CASES])
def test_bad_argument_is_one_line_exit_2_and_nothing_done(paths, line, fragment, capsys, monkeypatch):
    monkeypatch.delenv("HYBRIDEXIT_TOKEN", raising=False)
    monkeypatch.setenv("HYBRIDEXIT_DATA", paths["MISSING"])  # nothing may fall back to a real dataset
    code = main(_argv(line, paths))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "error:" in err and fragment in err, err
    assert "Traceback" not in err and "MYSECRET" not in err
    # refused before any work: nothing was created where the command line pointed
    assert not os.path.exists(paths["MISSING"]) and not os.path.exists(os.path.dirname(paths["OUT_MISSING"]))


def test_nonexistent_data_dir_is_not_created(paths, capsys):
    from hybridexit.data import load_cifar
    from hybridexit.errors import DatasetError

    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar("cifar10", paths["MISSING"])
    with pytest.raises(DatasetError, match="is a file"):
        load_cifar("cifar10", paths["FILE"])
    assert not os.path.exists(paths["MISSING"])


@pytest.mark.parametrize("line,fragment", [
    ("evaluate CK --limit 0", "--limit: 0 is not allowed"),
    ("serve CK --port 99999", "not a TCP port"),
    ("evaluate NOTOBJ", "not a hybridexit checkpoint config"),
    ("train-codec CK --recipe MISSING --out MISSING", "no such file"),
])
def test_no_traceback_reaches_the_terminal(paths, line, fragment):
    r = subprocess.run([sys.executable, "-m", "hybridexit.cli", *_argv(line, paths)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], r.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_shows_its_default():
    subs = _subparsers(build_parser())
    assert {"train", "summary", "energy", "evaluate", "calibrate", "serve", "edge"} <= set(subs)
    for name, p in subs.items():
        text = p.format_help()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            assert a.help and a.help.strip(), f"{name} {a.option_strings or a.dest}: no help"
            if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS) and "(default" not in a.help:
                shown = " ".join(map(str, a.default)) if isinstance(a.default, (list, tuple)) else str(a.default)
                assert f"(default: {shown})" in " ".join(text.split()), f"{name} {a.option_strings}: default not shown"


def test_version(capsys):
    from hybridexit import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hybridexit {__version__}"


def test_closed_stdout_is_a_quiet_exit():
    """``hybridexit summary | head -1``: the reader goes away; no BrokenPipeError traceback, status 141."""
    p = subprocess.Popen([sys.executable, "-m", "hybridexit.cli", "summary", "--edge-layers", "20", "--edge-bits", "1",
                          "--exits", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    assert p.wait(120) == 141 and p.stderr.read() == b""


def test_the_user_cache_may_be_created_for_a_download(tmp_path, monkeypatch):
    """Only the default location (no --data-dir, no $HYBRIDEXIT_DATA) is created, to download the dataset into."""
    from hybridexit.data import default_cache_dir, load_cifar
    from hybridexit.errors import DatasetError

    monkeypatch.delenv("HYBRIDEXIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert not default_cache_dir().exists()
    with pytest.raises(DatasetError, match="cifar10 not found: looked for"):  # not "does not exist"
        load_cifar("cifar10", None, download_ok=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_one_line(paths, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "a.png")
    code = main(["edge", paths["CK"], "--cloud", "http://127.0.0.1:9", "--retries", "0", "--images",
                 str(tmp_path / "imgs"), "--out", "/dev/full"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == "hybridexit: error: No space left on device"
