"""What the daemon and the workers share about the wire: gRPC settings, the bearer-token
check, and converting sampling parameters to and from their message."""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Iterable

from mtpd.model.sampling_params import SamplingParams
from mtpd.v1 import worker_pb2 as pb

# Activations of a large prefill chunk exceed gRPC's 4 MB default.
MESSAGE_LIMIT = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
]


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def bearer_token_matches(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> bool:
    """Whether the call's metadata carries "authorization: Bearer <token>"."""
    sent = dict(metadata or ()).get("authorization", "")
    sent = sent.encode() if isinstance(sent, str) else sent
    return hmac.compare_digest(sent, f"Bearer {token}".encode())


def sampling_to_wire(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(**dataclasses.asdict(params))


def sampling_from_wire(msg: pb.SamplingParams) -> SamplingParams:
    """Validated: a bad value raises InvalidParameter naming the field."""
    return SamplingParams(
        **{f.name: getattr(msg, f.name) for f in dataclasses.fields(SamplingParams)}
    )
