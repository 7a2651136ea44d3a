"""A missing optional dependency ends in one line that names the pyproject extra installing it (errors.need /
missing_extra), never in a ModuleNotFoundError traceback; every optional module the package imports is mapped to an
extra that really lists it."""

import ast
import re
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_checkpoint

import hybridexit
from hybridexit.cli import main
from hybridexit.errors import EXTRAS, HybridExitError, MissingExtra, need

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PKG = Path(hybridexit.__file__).parent
COMES_WITH = {"starlette": "fastapi", "h11": "uvicorn"}  # a dependency of a listed package, not listed itself


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dist(req: str) -> str:
    return re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1).lower()


def _imported_modules() -> set[str]:
    out = set()
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "need" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                out.add(node.args[0].value.split(".")[0])
    return out


def test_every_optional_import_is_mapped_to_an_extra_that_lists_it():
    proj = _project()
    core = {_dist(r) for r in proj["dependencies"]} | {"PIL", "tomllib", "hybridexit"}
    extras = {e: {_dist(r) for r in reqs} for e, reqs in proj["optional-dependencies"].items()}
    third_party = {m for m in _imported_modules() if m not in sys.stdlib_module_names and m not in core}
    assert third_party - set(EXTRAS) == set(), "optional imports with no extra in errors.EXTRAS"
    for module, extra in EXTRAS.items():
        assert COMES_WITH.get(module, module) in extras[extra], f"{module}: pyproject's [{extra}] does not list it"


def test_a_hidden_module_is_one_error_naming_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "constriction", None)  # import constriction now fails as if not installed
    with pytest.raises(MissingExtra, match=r"the learned codec \(bn\) needs constriction.*hybridexit\[codecs\]"):
        need("constriction", "the learned codec (bn)")
    with pytest.raises(MissingExtra, match=r"hybridexit\[runtime\]"):
        need("constriction", "x", extra="runtime")
    assert need("json") is sys.modules["json"]


def test_evaluate_with_a_codec_whose_module_is_missing_is_one_line(tmp_path, tiny_cifar, monkeypatch, capsys):
    ck = write_tiny_checkpoint(tmp_path / "ck")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    code = main(["evaluate", str(ck), "--data-dir", str(tiny_cifar), "--limit", "8", "--codec", "int8+zstd",
                 "--engine", "torch"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "needs zstandard" in err and "pip install 'hybridexit[codecs]'" in err, err


def test_an_unmapped_missing_module_is_still_one_line(monkeypatch, capsys):
    from hybridexit.cli.main import guarded

    def boom():
        import hybridexit_no_such_module  # noqa: F401

    assert guarded(boom) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("hybridexit: error: this command needs hybridexit_no_such_module, which is not installed: "
                   "pip install hybridexit_no_such_module")
    assert issubclass(MissingExtra, HybridExitError) and issubclass(MissingExtra, ModuleNotFoundError)
