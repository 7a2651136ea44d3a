"""The face: the ``hybridexit`` command (``main``). Parses, calls the library, prints; the only place that prints.
Errors become one line and a non-zero exit.

May import: anything in the package.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
