"""README.md and docs/results.md are what scripts/render_readme.py renders from the committed results, their links
resolve, and every image in results/ is linked from them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "scripts" / "render_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _links(md: Path) -> list[Path]:
    """Local link targets of a markdown file, resolved against its folder."""
    return [(md.parent / t).resolve() for t in LINK.findall(md.read_text()) if "://" not in t]


def test_generated_files_equal_the_rendering_of_the_committed_results(render):
    for rel, text in render.rendered().items():
        assert (ROOT / rel).read_text() == text, f"{rel} is out of date: run make readme"


def test_readme_first_screen_has_the_commands_and_the_headline(render):
    first = (ROOT / "README.md").read_text().splitlines()[:40]
    screen = "\n".join(first)
    assert first[0].startswith("# ")
    for needle in ("make demo", "make test", "## Result", "expected uJ/image", "88.6 %"):
        assert needle in screen, needle


def test_every_local_link_resolves():
    broken = [f"{md.relative_to(ROOT)} -> {t}" for md in _docs() for t in _links(md) if not t.exists()]
    assert not broken, broken


def test_paths_named_in_the_readme_commands_exist():
    """The checkpoints, recipes and scripts the usage names are in the tree (a fresh clone has them)."""
    named = set(re.findall(r"(?:checkpoints|recipes|scripts)/[\w.-]+", (ROOT / "README.md").read_text()))
    assert named, "the README names no checkpoint"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing


def test_every_png_in_results_is_linked():
    linked = {t for md in _docs() for t in _links(md)}
    unlinked = [p.name for p in sorted((ROOT / "results").glob("*.png")) if p.resolve() not in linked]
    assert not unlinked, f"unlinked images (link them from the text that discusses them, or remove them): {unlinked}"


def test_sections_tolerate_missing_results_files(render, monkeypatch):
    monkeypatch.setattr(render, "load", lambda name: None)
    readme = render.render(render.README_SECTIONS)
    results = render.render(render.RESULTS_SECTIONS)
    assert "make demo" in readme and "## Result" not in readme
    assert results.startswith("# Results") and "intermediate training stages" not in results
