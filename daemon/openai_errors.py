"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, from
the daemon's exceptions and from pydantic's."""

from __future__ import annotations

import json
import logging

from pydantic import ValidationError
from starlette.responses import JSONResponse

from mtpd.daemon.frontend import RequestTooLarge
from mtpd.daemon.request import QueueFullError, RequestFailed, RequestQuarantined
from mtpd.model.errors import InputError, InvalidParameter

log = logging.getLogger("mtpd.http")


class Unsupported(InvalidParameter):
    """A parameter asks for what mtpd does not do, or names what it does not know."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def api_error(e: Exception) -> ApiError:
    """The daemon's exceptions as OpenAI errors."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, RequestTooLarge):
        return ApiError(413, str(e), code="request_too_large")
    if isinstance(e, Unsupported):
        return ApiError(400, str(e), param=e.param, code="unsupported_parameter")
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), kind="rate_limit_error", code="queue_full")
    if isinstance(e, InputError):
        return ApiError(400, str(e), param=getattr(e, "param", None))
    if isinstance(e, RequestQuarantined):  # not 503: retrying it would fail again
        return ApiError(500, str(e), kind="server_error", code="request_quarantined")
    if isinstance(e, RequestFailed):
        return ApiError(503, str(e), kind="server_error", code="unavailable")
    log.exception("unexpected error", exc_info=e)  # the details are for the log alone
    return ApiError(500, "internal error", kind="server_error")


def validation_error(e: ValidationError) -> ApiError:
    # The deepest error is the most specific; a union adds its member's type to the path
    # (content.str, content.list[TextPart]), which is not part of the parameter's name.
    worst = max(e.errors(), key=lambda err: len(err["loc"]))
    parts = [p for p in worst["loc"] if not (isinstance(p, str) and _is_type_tag(p))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    got = f" (got {json.dumps(worst['input'])[:80]})" if worst["type"] != "missing" else ""
    return ApiError(400, f"{param or 'body'}: {worst['msg']}{got}", param=param or None)


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "none") or "[" in part or part[:1].isupper()
