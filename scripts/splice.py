"""The one way a renderer writes a generated section into a repository doc: the text between a begin marker and an
end marker (HTML comments, e.g. ``<!-- codecs:begin ... -->`` and ``<!-- codecs:end -->``) is replaced, everything
around it is kept byte for byte. Every renderer (scripts/render_*.py, benchmarks/*.py --render) calls this; the
library only returns markdown.

From a renderer outside scripts/:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from splice import splice_file
"""

from __future__ import annotations

from pathlib import Path


class SpliceError(Exception):
    """The doc lacks a marker (or has them out of order): nothing is written."""


def _bounds(text: str, begin: str, end: str, where: str = "the text") -> tuple[int, int]:
    i = text.find(begin)
    j = text.find(end, i + len(begin)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise SpliceError(f"{where} has no {begin!r} ... {end!r} section: add the two markers where it goes")
    return i + len(begin), j


def between(text: str, begin: str, end: str, where: str = "the text") -> str:
    """What stands between the markers now."""
    i, j = _bounds(text, begin, end, where)
    return text[i:j]


def splice(text: str, begin: str, end: str, body: str, where: str = "the text") -> str:
    """``text`` with the section between the markers replaced by a newline, ``body``, and a newline unless ``body``
    ends with one (so the markers stay on lines of their own)."""
    i, j = _bounds(text, begin, end, where)
    return text[:i] + "\n" + body + ("" if body.endswith("\n") else "\n") + text[j:]


def splice_file(path, begin: str, end: str, body: str) -> bool:
    """Splice ``body`` into the file at ``path``; returns whether the file changed (an unchanged file is not
    rewritten)."""
    path = Path(path)
    old = path.read_text()
    new = splice(old, begin, end, body, str(path))
    if new != old:
        path.write_text(new)
    return new != old


def render_main(doc, render, description: str = "") -> int:
    """``main`` of a renderer whose ``render()`` returns the doc's whole new text: writes it, or with ``--check``
    returns 1 when the doc is not the rendering (0 when it is)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--check", action="store_true", help=f"exit 1 if {doc} is not the rendering")
    a = p.parse_args()
    new = render()
    if a.check:
        return 0 if Path(doc).read_text() == new else 1
    Path(doc).write_text(new)
    return 0
