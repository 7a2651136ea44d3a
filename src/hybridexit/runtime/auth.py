"""The bearer token shared by the cloud server and its edge clients: read from a file or the environment, never
from the command line (where ``ps`` shows it to every user of the machine)."""

from __future__ import annotations

import os

from ..errors import HybridExitError

TOKEN_ENV = "HYBRIDEXIT_TOKEN"


class TokenError(HybridExitError):
    """The token file cannot be read or does not hold one token."""


def resolve_token(token_file=None) -> str | None:
    """The content of ``token_file`` (surrounding whitespace removed), else ``$HYBRIDEXIT_TOKEN``, else None."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"cannot read the token file {token_file} ({e})") from None
    if not token or len(token.split()) != 1:
        raise TokenError(f"the token file {token_file} must hold one token on one line (e.g. the output of "
                         f"`openssl rand -hex 32`)")
    return token
