"""The package's layout: every import (module level or inside a function) follows the layers each subpackage's
docstring states ("May import: ..."), and the module import graph has no cycle."""

import ast
import re
from pathlib import Path

import hybridexit

PKG = Path(hybridexit.__file__).parent
FOUNDATION = {"errors", "device", "threads"}  # top-level modules every part may import


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(["hybridexit", *parts]), f, rel.parts[-1] == "__init__"


def _imports(mod: str, f: Path, is_pkg: bool) -> set[str]:
    """Every hybridexit module ``mod`` imports, wherever the import statement sits."""
    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("hybridexit")}
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])]) if node.level else node.module or ""
            if not target.startswith("hybridexit"):
                continue
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import module`
    known = {m for m, _, _ in _modules()}
    return {t for t in out if t in known and t != mod}


def _part(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _allowed() -> dict[str, set[str]]:
    rules = {}
    for mod, f, is_pkg in _modules():
        if is_pkg and mod.count(".") == 1:
            doc = ast.get_docstring(ast.parse(f.read_text())) or ""
            m = re.search(r"May import: (.+?)\.\s*$", doc, re.S | re.M)
            assert m, f"{mod}'s docstring must say what it may import ('May import: ...')"
            rules[_part(mod)] = {"*"} if "anything" in m.group(1) else {p.strip() for p in m.group(1).split(",")}
    return rules


def _layer_breaks(rules: dict[str, set[str]], edges) -> list[str]:
    bad = []
    for mod, t in edges:
        part, tp = _part(mod), _part(t)
        if part not in rules or tp == part or tp == "" or "*" in rules[part]:
            continue
        if tp not in rules[part]:
            bad.append(f"{mod} imports {t}")
    return bad


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return [*stack[stack.index(t):], t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    graph = {m: _imports(m, f, p) for m, f, p in _modules()}
    # a package's __init__ re-exporting its own modules is not a cycle with them: drop edges to a parent package
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_every_part_imports_only_the_layers_below_it():
    rules = _allowed()
    assert {"model", "data", "calibration", "codecs", "engines", "runtime", "workflows", "cli"} <= set(rules)
    bad = _layer_breaks(rules, [(m, t) for m, ts in _graph().items() for t in ts])
    assert not bad, "imports across layers the docstrings do not allow:\n" + "\n".join(bad)


def test_foundation_modules_import_only_each_other():
    for mod, f, is_pkg in _modules():
        if _part(mod) in FOUNDATION:
            assert all(_part(t) in FOUNDATION for t in _imports(mod, f, is_pkg)), mod


def test_the_module_import_graph_has_no_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_find_a_planted_cycle_a_hidden_import_and_a_layer_break(tmp_path):
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    hidden = tmp_path / "up.py"  # an upward import hidden inside a function is still seen
    hidden.write_text("def g():\n    from ..cli import main\n")
    edges = [("hybridexit.model.up", t) for t in _imports("hybridexit.model.up", hidden, False)]
    assert ("hybridexit.model.up", "hybridexit.cli") in edges
    assert "hybridexit.model.up imports hybridexit.cli" in _layer_breaks(_allowed(), edges)
