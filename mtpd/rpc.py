"""What the daemon and the workers share about the wire: gRPC settings, the bearer-token
check, and converting sampling parameters to and from their message."""

from __future__ import annotations

import dataclasses
import hmac
from pathlib import Path

import grpc

from mtpd.model.sampling import SamplingParams
from mtpd.v1 import worker_pb2 as pb

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


def sampling_to_wire(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(**dataclasses.asdict(params))


def sampling_from_wire(msg: pb.SamplingParams) -> SamplingParams:
    """Validated: a bad value raises InvalidParameter naming the field."""
    return SamplingParams(
        **{f.name: getattr(msg, f.name) for f in dataclasses.fields(SamplingParams)}
    )
