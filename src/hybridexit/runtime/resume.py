"""``hybridexit edge --resume``: continue an interrupted ``--out`` file without losing or repeating an input.

The edge writes one JSON record per input, in input order, each flushed before the next input runs. A run that
was killed (or whose cloud went away and was stopped) leaves the records of a prefix of the inputs, possibly
followed by one line cut short by the kill. ``read_done`` checks that prefix against the inputs (indices 0..k-1 in
order, the same labels and paths), drops the cut line, and returns the records; the edge then runs inputs k.. and
appends. An input whose record was not complete on disk is run again; one whose record is complete never is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import HybridExitError


class ResumeError(HybridExitError):
    """The ``--out`` file cannot be continued for these inputs."""


def read_done(out, labels, paths=None) -> list[dict]:
    """The complete records at the start of ``out`` (after truncating a last line cut short). ``labels`` (and
    ``paths`` for image folders) of the inputs about to run: a file written for other inputs is refused."""
    p = Path(out)
    if not p.exists():
        return []
    raw = p.read_bytes()
    keep = raw.rfind(b"\n") + 1  # everything after the last newline is a record cut short
    recs = []
    for k, line in enumerate(raw[:keep].splitlines()):
        try:
            rec = json.loads(line)
            index = rec["index"]
        except (ValueError, KeyError, TypeError):
            raise ResumeError(f"{p} line {k + 1} is not an edge record: cannot resume from it; move it away and run "
                              f"without --resume") from None
        if index != k:
            raise ResumeError(f"{p} line {k + 1} holds input {index}, expected {k}: the records are not the prefix "
                              f"of one run; move it away and run without --resume")
        if k >= len(labels):
            raise ResumeError(f"{p} has records for more inputs ({k + 1}+) than there are now ({len(labels)})")
        if rec.get("label", -1) != int(labels[k]) or (paths is not None and rec.get("path") != paths[k]):
            raise ResumeError(f"{p} was written for other inputs (input {k}: label/path differ): resume with the "
                              f"same --split/--limit or --images as the interrupted run")
        recs.append(rec)
    if keep < len(raw):
        with open(p, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return recs
