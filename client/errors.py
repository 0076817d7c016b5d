"""Typed errors: each gRPC status the daemon answers with maps to one exception."""

from __future__ import annotations

import grpc


class MtpdError(Exception):
    """Base of every error the SDK raises; `code` is the gRPC status, when there is one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(MtpdError):
    """A bad field, a request over the size limit, a prompt that does not fit."""


class Overloaded(MtpdError):
    """The daemon's admission queue is full: retry later."""


class Unauthenticated(MtpdError):
    """The API token is missing or wrong."""


class Unavailable(MtpdError):
    """No daemon answers at the address, the model is still loading, or the pipeline
    failed."""


class UntrustedSocket(MtpdError):
    """The unix socket (or its directory) belongs to another user than you, root or the
    mtpd service: someone may have planted it to read prompts and tokens. Nothing was
    sent to it."""


class Timeout(MtpdError):
    """The call's deadline passed (the daemon frees the request's cache)."""


class Cancelled(MtpdError):
    """The call was cancelled."""


class ServerError(MtpdError):
    """Anything else: a bug in the daemon. INTERNAL is also the answer to a request that
    made a worker fail twice: it is not run again, and retrying it is pointless."""


_BY_CODE: dict[grpc.StatusCode, type[MtpdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error: grpc.RpcError) -> MtpdError:
    code = error.code()
    return _BY_CODE.get(code, ServerError)(f"{code.name}: {error.details()}", code)
