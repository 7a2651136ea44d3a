"""Argument types of the ``hybridexit`` command line: each option declares its type and range here, once.

Every function takes the string the user typed and returns the value, or raises ``argparse.ArgumentTypeError``
with a message that says what is allowed; ``Parser`` turns that into one line on stderr and exit status 2, before
any work starts. ``Parser`` also shows each option's default in ``--help``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

BadValue = argparse.ArgumentTypeError
POLICY_HELP = ("exit policy file to use instead of the checkpoint's own (thresholds, temperatures, guarantee), as "
               "`calibrate --policy-out FILE` writes it")


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a default worth showing."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if "(default" in h or d in (None, False, argparse.SUPPRESS) or d == [] or not action.option_strings:
            return h
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{h} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) and whose help shows the defaults.
    Options are never abbreviated (``--token`` is not taken for ``--token-file``).

    Sub-command parsers are made with the same class, so they behave alike."""

    def __init__(self, *args, formatter_class=HelpFormatter, allow_abbrev=False, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def refused(why: str):
    """An action for an option that no longer exists: refuses with ``why`` without echoing the value given."""

    class Refused(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} is not accepted: {why}")

    return Refused


# ---------------------------------------------------------------------------------------------- numbers
def _number(v: str, kind=float):
    try:
        x = kind(v)
    except ValueError:
        raise BadValue(f"{v!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(x):
        raise BadValue(f"{v} is not allowed: give a finite number")
    return x


def positive_int(v: str) -> int:
    n = _number(v, int)
    if n < 1:
        raise BadValue(f"{v} is not allowed: give a whole number of at least 1")
    return n


def non_negative_int(v: str) -> int:
    n = _number(v, int)
    if n < 0:
        raise BadValue(f"{v} is not allowed: give a whole number >= 0")
    return n


def finite_float(v: str) -> float:
    return _number(v)


def positive_float(v: str) -> float:
    x = _number(v)
    if x <= 0:
        raise BadValue(f"{v} is not allowed: give a number > 0")
    return x


def non_negative_float(v: str) -> float:
    x = _number(v)
    if x < 0:
        raise BadValue(f"{v} is not allowed: give a number >= 0")
    return x


def fraction(v: str) -> float:
    x = _number(v)
    if not 0 <= x <= 1:
        raise BadValue(f"{v} is not a fraction: give a number from 0 to 1 (0.25 means 25 %)")
    return x


def open_fraction(v: str) -> float:
    """A probability strictly between 0 and 1 (a risk level or a failure probability: 0 could never be certified,
    1 certifies nothing)."""
    x = _number(v)
    if not 0 < x < 1:
        raise BadValue(f"{v} is not allowed: give a number strictly between 0 and 1 (e.g. 0.05)")
    return x


def threshold(v: str) -> float:
    """An exit's entropy threshold (nats): a number >= 0; ``inf`` lets everything that reaches the exit stop."""
    from ..errors import ConfigError
    from ..model.policy import check_thresholds

    try:
        return check_thresholds([float(v)])[0]
    except ConfigError:  # before ValueError: ConfigError is one
        raise BadValue(f"{v} is not allowed: a threshold is an entropy in nats, a number >= 0 (0: never exit)") from None
    except ValueError:
        raise BadValue(f"{v!r} is not a number") from None


def port(v: str) -> int:
    n = _number(v, int)
    if not 0 <= n <= 65535:
        raise BadValue(f"{v} is not a TCP port: give 1 to 65535 (0: any free port)")
    return n


def http_url(v: str) -> str:
    from urllib.parse import urlsplit

    bad = BadValue(f"{v!r} is not a server URL: give http://HOST:PORT or https://HOST:PORT")
    try:
        u = urlsplit(v)
        u.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError:
        raise bad from None
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        raise bad
    return v


def device(v: str) -> str:
    """A torch device that exists here: cpu, cuda, cuda:N (N below the GPU count), mps."""
    import torch

    try:
        d = torch.device(v)
    except RuntimeError:
        raise BadValue(f"{v!r} is not a torch device: give cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise BadValue(f"{v}: no CUDA GPU is available here (use cpu)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise BadValue(f"{v}: there are {torch.cuda.device_count()} CUDA GPUs here (cuda:0 to cuda:"
                       f"{torch.cuda.device_count() - 1})")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise BadValue(f"{v}: MPS is not available here (use cpu)")
    if d.type not in ("cpu", "cuda", "mps"):
        raise BadValue(f"{v}: use cpu, cuda, cuda:N or mps")
    return v


# ---------------------------------------------------------------------------------------------- paths
def _existing(v: str, folder: bool) -> str:
    p, want, other = Path(v), "folder" if folder else "file", "file" if folder else "folder"
    if not p.exists():
        raise BadValue(f"{v}: no such {want}")
    if p.is_dir() != folder:
        raise BadValue(f"{v} is a {other}, not a {want}")
    if not os.access(p, os.R_OK):
        raise BadValue(f"{v}: not readable (permission denied)")
    return v


def existing_dir(v: str) -> str:
    return _existing(v, folder=True)


def existing_file(v: str) -> str:
    return _existing(v, folder=False)


def checkpoint_dir(v: str) -> str:
    """A checkpoint directory: it exists and holds config.json (its contents are checked when it is loaded)."""
    p = Path(v)
    if p.exists() and not p.is_dir():
        raise BadValue(f"{v} is not a checkpoint: it is a file (a checkpoint is a folder with config.json)")
    if not p.exists() and not p.with_name(p.name + ".old").is_dir():  # .old: an interrupted write, recovered on load
        raise BadValue(f"{v} is not a checkpoint: no such folder")
    return v


def output_file(v: str) -> str:
    """A file to write: its folder exists and is writable; the path is not a folder."""
    p = Path(v)
    parent = p.parent
    if p.is_dir():
        raise BadValue(f"{v} is a folder: give a file name")
    if not parent.is_dir():
        raise BadValue(f"cannot write {v}: folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise BadValue(f"cannot write {v}: permission denied")
    return v


def output_dir(v: str) -> str:
    """A folder to write (created with its parents): not a file, and its nearest existing ancestor is writable."""
    p = Path(v)
    if p.exists() and not p.is_dir():
        raise BadValue(f"{v} is a file: give a folder")
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise BadValue(f"cannot create {v}: {anc} is a file")
    if not os.access(anc, os.W_OK):
        raise BadValue(f"cannot write {v}: permission denied on {anc}")
    return v


# ---------------------------------------------------------------------------------------------- codecs
def add_codec_option(p, default: str | None, what: str = "", compress_alias: bool = False) -> None:
    """``--codec``: its choices and help read the codec registry (``hybridexit.codecs.CODEC_CHOICES`` / ``CODEC_HELP``).
    ``compress_alias``: also ``--compress``, the deprecated spelling of ``+zstd`` (``codec_of`` maps it)."""
    from ..codecs import CODEC_CHOICES, CODEC_HELP

    p.add_argument("--codec", default=default, choices=list(CODEC_CHOICES), help=CODEC_HELP + what)
    if compress_alias:
        p.add_argument("--compress", action="store_true", help="deprecated: --codec NAME+zstd (fp32, fp16, int8)")


def codec_of(a) -> str | None:
    """The codec an ``add_codec_option`` parse names: ``--codec int8 --compress`` is ``int8+zstd`` (with a one-line
    warning that --compress is deprecated); --compress on a codec that codes its own payload is refused."""
    import warnings

    from ..codecs import V1_NAMES, ZSTD
    from ..errors import ConfigError

    if not getattr(a, "compress", False):
        return a.codec
    base = a.codec or "fp32"
    if base not in V1_NAMES:
        raise ConfigError(f"--compress applies to fp32, fp16 and int8 only (codec {base} codes its own payload)")
    warnings.warn(f"--compress is deprecated: use --codec {base}{ZSTD}", FutureWarning, stacklevel=2)
    return base + ZSTD
