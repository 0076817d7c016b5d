"""What the daemon and the workers share about the wire: gRPC settings, the bearer-token
check, and converting sampling parameters to and from their message."""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from mtpd.model.errors import InputError
from mtpd.model.sampling_params import SamplingParams
from mtpd.v1 import worker_pb2 as pb

# Activations of a large prefill chunk exceed gRPC's 4 MB default.
MESSAGE_LIMIT = 512 * 1024 * 1024
# The worker plane's control messages (a join, a rendezvous key, Load, GetInfo, Reset,
# GetStats) are a few hundred bytes: the registry's receive limit, and a worker's for its
# unary calls (its step stream carries activations).
CONTROL_MESSAGE_LIMIT = 64 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
]


def refusing_handler(
    handler: grpc.RpcMethodHandler, refuse, refuse_stream
) -> grpc.RpcMethodHandler:
    """A handler that answers `handler`'s call with `refuse` (or `refuse_stream` for a
    streamed response) and takes the request as a stream it never reads: a refused call's
    request is neither parsed nor received (a unary request is a stream of one message on
    the wire, so the caller cannot tell)."""
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse_stream, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        refuse, response_serializer=handler.response_serializer
    )


class TokenGate(grpc.ServerInterceptor):
    """Refuses a call without "authorization: Bearer <token>" (UNAUTHENTICATED) from its
    metadata alone, before its request is parsed: the workers' and the registry's gate."""

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or bearer_token_matches(details.invocation_metadata, self._token):
            return handler

        def refuse(requests: Iterator[bytes], context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing worker token")

        def refuse_stream(requests: Iterator[bytes], context: grpc.ServicerContext):
            refuse(requests, context)
            yield  # pragma: no cover  (makes this a generator)

        return refusing_handler(handler, refuse, refuse_stream)


class UnaryRequestLimit(grpc.ServerInterceptor):
    """Refuses a unary request over `limit` bytes (RESOURCE_EXHAUSTED) before parsing it.
    A server's receive limit is one for all its methods, and a worker's must admit a step
    carrying a prefill chunk's activations; no control call needs more than a few KB."""

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        parse = handler.request_deserializer
        behave = handler.unary_stream if handler.response_streaming else handler.unary_unary
        limit, method = self._limit, details.method

        def bounded(raw: bytes, context: grpc.ServicerContext):
            if len(raw) > limit:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{method}: a request of {len(raw)} bytes (at most {limit})",
                )
            try:
                request = parse(raw) if parse else raw
            except DecodeError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: malformed request")
            return behave(request, context)

        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make(bounded, response_serializer=handler.response_serializer)


@dataclass(frozen=True)
class WorkerTLS:
    """Mutual TLS on the worker plane (the registry, the workers' services, the daemon's
    calls to them): every side presents `cert` (with `key`) and accepts only peers whose
    certificate `ca` signed. One certificate for the whole pipeline will do."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, ca: str | None) -> WorkerTLS | None:
        given = [x for x in (cert, key, ca) if x]
        if not given:
            return None
        if len(given) != 3:
            raise InputError("worker TLS needs a certificate, its key and the CA, all three")
        tls = cls(Path(cert), Path(key), Path(ca))  # type: ignore[arg-type]
        for path in (tls.cert, tls.key, tls.ca):
            if not path.is_file():
                raise InputError(f"{path}: no such file (worker TLS)")
        return tls

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


def listen_worker_plane(server: grpc.Server, listen: str, tls: WorkerTLS | None) -> int:
    """Add the listener (TLS with a certificate); returns its port, 0 on failure."""
    if tls is None or listen.startswith("unix:"):
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, tls.server_credentials())


def worker_plane_channel(address: str, tls: WorkerTLS | None, options=None) -> grpc.Channel:
    if tls is None or address.startswith("unix:"):
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


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
