"""gRPC settings and the bearer-token check shared by the daemon and the workers."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

# Activations of a large prefill chunk exceed gRPC's 4 MB default.
MESSAGE_LIMIT = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
]


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def bearer_token_matches(context: grpc.ServicerContext, token: str) -> bool:
    sent = dict(context.invocation_metadata()).get("authorization", "")
    return hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())


def read_token_file(path: str) -> str:
    """The shared secret in `path` (surrounding whitespace ignored); never empty."""
    from mtpd.model.errors import InputError

    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise InputError(f"cannot read the token file {path!r}: {e.strerror}") from None
    if not token:
        raise InputError(f"the token file {path!r} is empty")
    return token
