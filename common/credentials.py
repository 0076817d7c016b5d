"""Reading shared secrets (the worker token, the API token) from files. Torch-free: the
client CLI reads its token with it."""

from __future__ import annotations

from pathlib import Path


class TokenFileError(Exception):
    """The token file is unreadable or empty; the message names it."""


def read_token_file(path: str) -> str:
    """The secret in `path` (surrounding whitespace ignored); never empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise TokenFileError(f"cannot read the token file {path!r}: {e.strerror}") from None
    if not token:
        raise TokenFileError(f"the token file {path!r} is empty")
    return token
