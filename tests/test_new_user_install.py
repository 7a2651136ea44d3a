"""Every user command on what `pip install hybridexit` (plus the extras its docs name) installs, not on this
development environment (issue 35, item 2).

How, without the internet and in seconds: the commands run in a child Python whose ``sitecustomize`` puts an import
guard first on ``sys.meta_path``. The guard computes, from pyproject.toml and the installed packages' own metadata,
the distributions a fresh install would bring: hybridexit's dependencies and those of the named extras, with their
dependencies, transitively (requirements behind an ``extra ==`` marker left out). A third-party module from any other
distribution (``tabulate`` of the ``dev`` extra, ``pytest``, ``onnx`` when the ``onnx`` extra is not named ...) is
unimportable there, as it would be on the user's machine. The standard library, hybridexit itself and files that
belong to no distribution are untouched. Then every command's ``--help`` and a tiny run of the commands that need no
optional extra, and of ``serve`` + ``edge`` with the ``runtime`` extra.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import write_tiny_checkpoint, write_tiny_cifar10

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "summary", "energy", "evaluate", "export", "train-codec", "export-codec", "calibrate", "sweep",
            "report", "serve", "edge")

GUARD = textwrap.dedent('''
    """Import guard of tests/test_new_user_install.py: only what a fresh install of hybridexit would have."""
    import importlib.metadata as md
    import os
    import re
    import sys

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport, a dependency of hybridexit there
        import tomli as tomllib

    def _norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    def _name(req):
        return _norm(re.match(r"\\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))

    def _closure(reqs):
        seen, todo = set(), [r for r in reqs if "extra ==" not in r.replace("extra==", "extra ==")]
        while todo:
            n = _name(todo.pop())
            if n in seen:
                continue
            seen.add(n)
            try:
                todo += [r for r in (md.requires(n) or []) if "extra" not in r.split(";", 1)[-1] or ";" not in r]
            except md.PackageNotFoundError:
                pass
        return seen

    def allowed_dists(extras):
        proj = tomllib.loads(open(os.environ["HYBRIDEXIT_PYPROJECT"], "rb").read().decode())["project"]
        reqs = list(proj["dependencies"])
        for e in extras:
            reqs += proj["optional-dependencies"][e]
        return _closure(reqs)

    class Guard:
        def __init__(self):
            self.owners = {m: [_norm(d) for d in ds] for m, ds in md.packages_distributions().items()}
            self.allow(os.environ.get("HYBRIDEXIT_EXTRAS", ""))

        def allow(self, extras):
            self.extras = [e for e in extras.split(",") if e]
            self.allowed = allowed_dists(self.extras)
            os.environ["HYBRIDEXIT_EXTRAS"] = ",".join(self.extras)  # and for child processes (serve)

        def blocked(self, name):
            top = name.partition(".")[0]
            if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "hybridexit":
                return False
            dists = self.owners.get(top)
            return bool(dists) and not any(d in self.allowed for d in dists)

        def find_spec(self, name, path=None, target=None):
            """Absent (None, as ``importlib.util.find_spec`` probes see it) when blocked, else the first of the
            finders that were there before the guard."""
            if self.blocked(name):
                return None
            for f in self.finders:
                spec = f.find_spec(name, path, target) if hasattr(f, "find_spec") else None
                if spec is not None:
                    return spec
            return None

        def find_distributions(self, *a, **kw):  # package metadata stays visible (it is how the guard reads it)
            for f in self.finders:
                if hasattr(f, "find_distributions"):
                    yield from f.find_distributions(*a, **kw)

        def invalidate_caches(self):
            for f in self.finders:
                if hasattr(f, "invalidate_caches"):
                    f.invalidate_caches()

    GUARD = Guard.__new__(Guard)
    GUARD.finders = list(sys.meta_path)
    GUARD.__init__()
    sys.meta_path[:] = [GUARD]
''')

DRIVER = textwrap.dedent('''
    import contextlib, io, json, sys, warnings
    import sitecustomize
    from hybridexit.cli import build_parser, main
    warnings.simplefilter("ignore")
    p = json.loads(sys.argv[1])
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    missing = sorted(set(p["commands"]) - set(sub.choices))
    assert not missing, f"commands missing from the parser on a fresh install: {missing}"
    def run(argv, what):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        assert code == 0, f"{what}: hybridexit {' '.join(argv)} -> exit {code}: {err.getvalue()[-2000:]}"
        return out.getvalue()
    for c in p["commands"]:
        assert "usage:" in run([c, "--help"], "core")
    for argv in p["core"]:
        run(argv, "core")
    sitecustomize.GUARD.allow("runtime")
    from hybridexit.runtime.process import ServerProcess
    with ServerProcess(p["ck"], env={"HYBRIDEXIT_TOKEN": "tok-0123456789"}) as srv:
        import os
        os.environ["HYBRIDEXIT_TOKEN"] = "tok-0123456789"
        s = json.loads(run(["edge", p["ck"], "--cloud", srv.url, "--images", p["images"], "--codec", "int8+zstd",
                            "--json"], "runtime"))
        assert s["n"] == 3 and s["failed_requests"] == 0, s
    print("ok")
''')


def _guarded_env(tmp_path, extras=""):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GUARD)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")]),
            "HYBRIDEXIT_PYPROJECT": str(ROOT / "pyproject.toml"), "HYBRIDEXIT_EXTRAS": extras,
            "OMP_NUM_THREADS": "1"}


def test_the_guard_hides_what_a_fresh_install_lacks(tmp_path):
    code = "import numpy, PIL, safetensors\n" \
           "for m in ('pytest', 'ruff', 'trustme', 'fastapi', 'onnx'):\n" \
           "    try:\n        __import__(m)\n    except ModuleNotFoundError:\n        pass\n" \
           "    else:\n        raise SystemExit(m + ' importable')\nprint('ok')"
    r = subprocess.run([sys.executable, "-c", code], env=_guarded_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_every_command_works_without_the_dev_extra(tmp_path):
    from PIL import Image

    ck = write_tiny_checkpoint(tmp_path / "ck")
    data = write_tiny_cifar10(tmp_path / "data")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / "imgs" / f"{i}.png")
    results = tmp_path / "results"
    results.mkdir()
    (results / "sweep-cifar100.json").write_text("[]")
    docs = tmp_path / "docs" / "sweep.md"
    docs.parent.mkdir()
    core = [["summary", "--depth", "8", "--edge-layers", "4", "--edge-bits", "1", "--exits", "4"],
            ["energy", "--checkpoint", str(ck), "--exit-rate", "0.5", "--link", "wifi", "--json"],
            ["evaluate", str(ck), "--images", str(tmp_path / "imgs"), "--json"],
            ["train", "--data-dir", str(data), "--out", str(tmp_path / "run"), "--depth", "8", "--edge-layers", "4",
             "--edge-bits", "1", "--exits", "4", "--epochs", "1", "--val-size", "20", "--limit-train", "32",
             "--batch-size", "16", "--device", "cpu"],
            ["calibrate", str(tmp_path / "run"), "--data-dir", str(data), "--exit-fraction", "0.5", "--json"],
            ["report", "--results-dir", str(results), "--out", str(docs)]]
    args = {"commands": COMMANDS, "core": core, "ck": str(ck), "images": str(tmp_path / "imgs")}
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], env=_guarded_env(tmp_path), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert "### Table III" in docs.read_text()
