"""The OpenAI-compatible HTTP API (`mtpd serve --http HOST:PORT`): chat completions,
completions, the model list, a health check and the Prometheus metrics, as a Starlette
app served by uvicorn inside the daemon process. Every generation goes through the same
`Frontend.generate` as gRPC, so batching, cancellation and metrics are shared.

Where OpenAI and mtpd differ, OpenAI's behaviour wins: temperature defaults to 1, a
missing seed samples afresh each time, a missing max_tokens means "until the context is
full" for chat (16 tokens for completions, OpenAI's default there). A parameter asking
for what mtpd lacks (JSON mode) is refused by name rather than ignored; unknown
parameters are ignored, as OpenAI's newer parameters arrive before any server knows
them. Tools, tool calls and reasoning follow daemon/chat.py; `n` choices are n requests
in one batch, choice i with seed + i."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mtpd.daemon.chat import chat_prompt
from mtpd.daemon.choices import all_or_none, choice_streams
from mtpd.daemon.coordinator import Coordinator
from mtpd.daemon.frontend import Frontend
from mtpd.daemon.generation import Prompt
from mtpd.daemon.metrics import metrics_registry
from mtpd.daemon.openai_bodies import ChatCompletionRequest, CompletionRequest, SamplingBody
from mtpd.daemon.openai_errors import ApiError, api_error, validation_error
from mtpd.daemon.openai_replies import Reply, events, whole
from mtpd.model.errors import check_unicode
from mtpd.rpc import bearer_token_matches
from mtpd.v1 import inference_pb2 as api

log = logging.getLogger("mtpd.http")

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

T = TypeVar("T")


def _check_strings(data: Any) -> None:
    """Every string in the body valid Unicode: JSON may spell a lone surrogate
    ("\\ud800"), which no tokenizer or encoder accepts."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            check_unicode(value, path or "body")
        elif isinstance(value, dict):
            for key, item in value.items():
                check_unicode(key, f"{path or 'body'} (a key)")
                stack.append((f"{path}.{key}".lstrip("."), item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


# -- streaming that notices a client going away -------------------------------------------


class EventStream(StreamingResponse):
    """Server-sent events that stop the moment the client disconnects: the disconnect is
    awaited beside the stream instead of being found at the next write, so a request whose
    next tokens are slow to come is cancelled at once (cancelling its generator cancels
    the request on every worker)."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                with contextlib.suppress(OSError):  # the client went away mid-write
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():  # the client went away first
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


# -- the app --------------------------------------------------------------------------------


class OpenAIApp:
    """The routes, over one Frontend."""

    def __init__(
        self, front: Frontend, model_name: str | None, api_token: str | None, metrics: bool
    ) -> None:
        self.front, self._model_name, self.api_token = front, model_name, api_token
        self.created = int(time.time())
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        if metrics:
            self._registry = metrics_registry(front)
            routes.append(Route("/metrics", self.metrics, methods=["GET"]))
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception},
        )

    @property
    def model_name(self) -> str:
        """The model id: as configured, else the model file's (or directory's) name."""
        if self._model_name:
            return self._model_name
        path = self.front.loaded().model_path
        return path.stem if path.is_file() else path.name

    # -- plumbing -------------------------------------------------------------------------

    def _check_token(self, request: Request) -> None:
        if self.api_token is not None and not bearer_token_matches(
            request.headers.items(), self.api_token
        ):
            raise ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <token>'",
                code="invalid_api_key",
            )

    @staticmethod
    async def _http_exception(request: Request, e: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} not allowed here"}
        return ApiError(e.status_code, message.get(e.status_code, str(e.detail))).response()

    async def _body(self, request: Request) -> Any:
        """The JSON body, read no further than the size limit."""
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit():
            self.front.check_size(int(declared))
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                self.front.check_size(len(body))
        except ClientDisconnect:
            raise ApiError(400, "the client went away while sending the body") from None
        try:
            data = json.loads(body)
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
        # ValueError: JSON's own errors, and integers over Python's 4300 digits.
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        _check_strings(data)
        return data

    async def _parse(self, request: Request, schema: type[SamplingBody]) -> SamplingBody:
        self._check_token(request)
        data = await self._body(request)
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model != self.model_name:
            raise ApiError(
                404,
                f"model: {body.model!r} is not served here; this daemon serves "
                f"{self.model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        body.refuse_unsupported()
        return body

    async def _generation(self, request: Request, schema: type[SamplingBody]) -> Response:
        arrived = time.monotonic()
        front = self.front
        streams: list[AsyncIterator[api.GenerateChunk]] = []
        try:
            body = await self._parse(request, schema)
            daemon = front.ready()
            prompt = await asyncio.to_thread(self._prompt, daemon, body)
            if isinstance(body, ChatCompletionRequest):
                room = max(1, daemon.pipeline.max_context - len(prompt.ids))
                max_tokens = body.max_completion_tokens or body.max_tokens or room
            else:
                max_tokens = body.max_tokens or COMPLETION_MAX_TOKENS
            request_id = front.request_id()
            options = body.options(max_tokens)
            streams = choice_streams(front, prompt, options, request_id, arrived)
            # The first chunks before the response starts: a refusal (a full queue, a
            # prompt too long) is then a status, not an error inside a 200 stream.
            firsts = await _unless_disconnected(request, all_or_none(anext(s) for s in streams))
            if firsts is None:
                return Response(status_code=499)  # the client went away while queued
            replies = [
                Reply(request_id.caller, self.model_name, body, daemon.tokenizer, i)
                for i in range(body.n)
            ]
            if body.stream:
                return EventStream(events(replies, firsts, streams))
            result = await _unless_disconnected(request, whole(replies, firsts, streams))
            return Response(status_code=499) if result is None else JSONResponse(result)
        except Exception as e:
            for stream in streams:
                await stream.aclose()
            error = api_error(e)
            if error.status in (400, 404, 413, 429):
                front.rejected += 1
            return error.response()

    @staticmethod
    def _prompt(daemon: Coordinator, body: SamplingBody) -> Prompt:
        if isinstance(body, ChatCompletionRequest):
            return chat_prompt(daemon, body.to_proto(), body.output_format() is not None)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            return Prompt(list(prompt))
        return Prompt(daemon.tokenizer.encode(prompt[0] if isinstance(prompt, list) else prompt))

    # -- routes ---------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generation(request, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response:
        return await self._generation(request, CompletionRequest)

    def _model_card(self) -> dict:
        daemon = self.front.loaded()
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "mtpd",
            "max_model_len": daemon.pipeline.max_context,
        }

    async def models(self, request: Request) -> Response:
        return await self._answer(request, lambda: {"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        def card() -> dict:
            if request.path_params["model"] != self.model_name:
                raise ApiError(
                    404,
                    f"model {request.path_params['model']!r} is not served here",
                    param="model",
                    code="model_not_found",
                )
            return self._model_card()

        return await self._answer(request, card)

    async def _answer(self, request: Request, make: Callable[[], dict]) -> Response:
        try:
            self._check_token(request)
            return JSONResponse(make())
        except Exception as e:
            return api_error(e).response()

    async def metrics(self, request: Request) -> Response:
        """The Prometheus metrics (behind the token, when one is set)."""
        try:
            self._check_token(request)
        except ApiError as e:
            return e.response()
        # Collecting asks the workers for their stats: off the event loop.
        text = await asyncio.to_thread(generate_latest, self._registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def health(self, request: Request) -> Response:
        """200 once the model is loaded and the pipeline can generate. Open to probes, so
        it says the state and no more: why a pipeline failed is for the log and for
        callers with the token."""
        status = self.front.status()
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)
