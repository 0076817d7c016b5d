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
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mtpd import __version__
from mtpd.daemon.chat import chat_prompt
from mtpd.daemon.coordinator import Coordinator
from mtpd.daemon.frontend import Frontend, RequestTooLarge
from mtpd.daemon.generation import FINISH_NAMES, Prompt
from mtpd.daemon.metrics import metrics_registry
from mtpd.daemon.options import MAX_TOP_LOGPROBS, GenerationOptions
from mtpd.daemon.scheduler import QueueFullError, RequestFailed, RequestQuarantined
from mtpd.model.errors import InputError, InvalidParameter, check_unicode
from mtpd.model.sampling_params import MAX_SEED
from mtpd.model.tokenizer import Tokenizer
from mtpd.rpc import bearer_token_matches
from mtpd.v1 import inference_pb2 as api

log = logging.getLogger("mtpd.http")

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

T = TypeVar("T")


# -- the request bodies --------------------------------------------------------------


class _Body(BaseModel):
    # strict: "5" is not a number and 1 is not a boolean, as in OpenAI's own checks.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1)  # choice i draws with seed + i
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # mtpd's own sampling and drafting controls (the openai SDK sends them via extra_body)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    draft_tokens: int | None = None
    ignore_eos: bool = False

    def refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options: only allowed with stream")

    def options(self, max_tokens: int) -> GenerationOptions:
        extras = {
            k: v
            for k in ("top_k", "min_p", "repetition_penalty", "draft_tokens")
            if (v := getattr(self, k)) is not None
        }
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        # No seed: a fresh one, so sampling varies from call to call as with OpenAI.
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        return GenerationOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
            stop=tuple(stop),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=_token_ids(self.logit_bias or {}),
            **self.logprob_options(),
            **extras,
        )

    def logprob_options(self) -> dict[str, Any]:
        return {}


def _token_ids(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids as JSON strings."""
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise InvalidParameter(f"logit_bias: key {key!r} is not a token id", "logit_bias")
        out[int(key)] = value
    return out


class TextPart(_Body):
    type: Literal["text"]
    text: str


class CalledFunction(_Body):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends JSON text; some clients an object


class MessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def to_proto(self) -> api.ChatMessage:
        # "developer" is OpenAI's newer name for the system role.
        return api.ChatMessage(
            role="system" if self.role == "developer" else self.role,
            content=self.text(),
            name=self.name or "",
            tool_call_id=self.tool_call_id or "",
            reasoning_content=self.reasoning_content or "",
            tool_calls=[
                api.ToolCall(
                    id=c.id,
                    name=c.function.name,
                    arguments=c.function.arguments
                    if isinstance(c.function.arguments, str)
                    else json.dumps(c.function.arguments, ensure_ascii=False),
                )
                for c in self.tool_calls or []
            ],
        )


class FunctionSpec(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # honoured once constrained decoding lands


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # via extra_body, as vLLM takes it

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.functions:
            raise Unsupported("functions", "functions: deprecated by OpenAI; send tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise Unsupported("response_format", "response_format: only {'type': 'text'}")

    def logprob_options(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs or 0}

    def to_proto(self) -> api.ChatRequest:
        choice = api.ToolChoice()
        if isinstance(self.tool_choice, NamedToolChoice):
            choice.function = self.tool_choice.function.name
        elif self.tool_choice is not None:
            choice.mode = self.tool_choice
        return api.ChatRequest(
            messages=[m.to_proto() for m in self.messages],
            tools=[
                api.Tool(
                    name=t.function.name,
                    description=t.function.description or "",
                    parameters=""
                    if t.function.parameters is None
                    else json.dumps(t.function.parameters, ensure_ascii=False),
                )
                for t in self.tools or []
            ],
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
            chat_template_kwargs=json.dumps(self.chat_template_kwargs)
            if self.chat_template_kwargs
            else "",
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None  # the legacy API's: this many top tokens' too

    def logprob_options(self) -> dict[str, Any]:
        if self.logprobs is None:
            return {}
        if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameter(
                f"logprobs: must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}", "logprobs"
            )
        return {"logprobs": True, "top_logprobs": self.logprobs}

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise Unsupported("echo", "echo: mtpd does not echo the prompt")
        if self.suffix:
            raise Unsupported("suffix", "suffix: mtpd does not insert text")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", "best_of: mtpd generates one completion")
        several = isinstance(self.prompt, list) and len(self.prompt) > 1
        if several and not isinstance(self.prompt[0], int):
            raise Unsupported("prompt", "prompt: one prompt per request")


# -- errors in OpenAI's shape -----------------------------------------------------------


class Unsupported(InvalidParameter):
    """A parameter asks for what mtpd does not do, or names what it does not know."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param)


class _ApiError(Exception):
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


def _api_error(e: Exception) -> _ApiError:
    """The daemon's exceptions as OpenAI errors."""
    if isinstance(e, _ApiError):
        return e
    if isinstance(e, RequestTooLarge):
        return _ApiError(413, str(e), code="request_too_large")
    if isinstance(e, Unsupported):
        return _ApiError(400, str(e), param=e.param, code="unsupported_parameter")
    if isinstance(e, QueueFullError):
        return _ApiError(429, str(e), kind="rate_limit_error", code="queue_full")
    if isinstance(e, InputError):
        return _ApiError(400, str(e), param=getattr(e, "param", None))
    if isinstance(e, RequestQuarantined):  # not 503: retrying it would fail again
        return _ApiError(500, str(e), kind="server_error", code="request_quarantined")
    if isinstance(e, RequestFailed):
        return _ApiError(503, str(e), kind="server_error", code="unavailable")
    log.exception("unexpected error", exc_info=e)  # the details are for the log alone
    return _ApiError(500, "internal error", kind="server_error")


def _validation_error(e: ValidationError) -> _ApiError:
    # The deepest error is the most specific; a union adds its member's type to the path
    # (content.str, content.list[TextPart]), which is not part of the parameter's name.
    worst = max(e.errors(), key=lambda err: len(err["loc"]))
    parts = [p for p in worst["loc"] if not (isinstance(p, str) and _is_type_tag(p))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    got = f" (got {json.dumps(worst['input'])[:80]})" if worst["type"] != "missing" else ""
    return _ApiError(400, f"{param or 'body'}: {worst['msg']}{got}", param=param or None)


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


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "none") or "[" in part or part[:1].isupper()


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


def _event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# -- the app --------------------------------------------------------------------------------


def _usage(lasts: list[api.GenerateChunk]) -> dict:
    """The choices' last chunks' usage: the prompt once, the completions summed, and
    mtpd's draft statistics of the first choice."""
    u, d, t = lasts[0].usage, lasts[0].drafts, lasts[0].timing
    completion = sum(last.usage.completion_tokens for last in lasts)
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": u.prompt_tokens + completion,
        # mtpd's extension: how speculative decoding went for this request.
        "mtpd": {
            "draft_policy": d.draft_policy,
            "steps": d.steps,
            "drafted": d.drafted,
            "accepted": d.accepted,
            "acceptance_by_position": list(d.acceptance_by_position),
            "tokens_per_step": d.tokens_per_step,
            "time_to_first_token_s": t.time_to_first_token_s,
            "decode_tokens_per_s": t.decode_tokens_per_s,
        },
    }


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
            raise _ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <token>'",
                code="invalid_api_key",
            )

    @staticmethod
    async def _http_exception(request: Request, e: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} not allowed here"}
        return _ApiError(e.status_code, message.get(e.status_code, str(e.detail))).response()

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
            raise _ApiError(400, "the client went away while sending the body") from None
        try:
            data = json.loads(body)
        except RecursionError:
            raise _ApiError(400, "the body is not valid JSON: nested too deeply") from None
        # ValueError: JSON's own errors, and integers over Python's 4300 digits.
        except (UnicodeDecodeError, ValueError) as e:
            raise _ApiError(400, f"the body is not valid JSON: {e}") from None
        _check_strings(data)
        return data

    async def _parse(self, request: Request, schema: type[_Sampling]) -> _Sampling:
        self._check_token(request)
        data = await self._body(request)
        if not isinstance(data, dict):
            raise _ApiError(400, "the body must be a JSON object")
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if body.model != self.model_name:
            raise _ApiError(
                404,
                f"model: {body.model!r} is not served here; this daemon serves "
                f"{self.model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        body.refuse_unsupported()
        return body

    async def _generation(self, request: Request, schema: type[_Sampling]) -> Response:
        arrived = time.monotonic()
        front = self.front
        streams: list[AsyncIterator[api.GenerateChunk]] = []
        try:
            body = await self._parse(request, schema)
            daemon = front.ready()
            if body.n > daemon.pipeline.max_seqs:
                raise Unsupported(
                    "n",
                    f"n: at most {daemon.pipeline.max_seqs}, the sequences decoded together "
                    "(mtpd serve --max-seqs)",
                )
            # One reader per choice: a chat's reply reader keeps its reply's state.
            prompts = [await asyncio.to_thread(self._prompt, daemon, body) for _ in range(body.n)]
            if isinstance(body, ChatCompletionRequest):
                room = max(1, daemon.pipeline.max_context - len(prompts[0].ids))
                max_tokens = body.max_completion_tokens or body.max_tokens or room
            else:
                max_tokens = body.max_tokens or COMPLETION_MAX_TOKENS
            request_id = front.request_id()
            options = body.options(max_tokens)
            for i, prompt in enumerate(prompts):  # choice i draws with seed + i
                choice = dataclasses.replace(options, seed=(options.seed + i) % (MAX_SEED + 1))
                streams.append(
                    front.generate(
                        lambda _, p=prompt: p,
                        choice,
                        request_id if body.n == 1 else f"{request_id}.{i}",
                        arrived,
                        prompt_field="prompt",
                    )
                )
            # The first chunks before the response starts: a refusal (a full queue, a
            # prompt too long) is then a status, not an error inside a 200 stream.
            firsts = await _unless_disconnected(request, _all_or_none(anext(s) for s in streams))
            if firsts is None:
                return Response(status_code=499)  # the client went away while queued
            replies = [
                _Reply(request_id, self.model_name, body, daemon.tokenizer, i)
                for i in range(body.n)
            ]
            if body.stream:
                return EventStream(_events(replies, firsts, streams))
            collected = _all_or_none(
                r.collect(f, s) for r, f, s in zip(replies, firsts, streams, strict=True)
            )
            result = await _unless_disconnected(request, collected)
            if result is None:
                return Response(status_code=499)
            out = replies[0]._envelope([choice for choice, _ in result], False)
            out["usage"] = _usage([last for _, last in result])
            return JSONResponse(out)
        except Exception as e:
            for stream in streams:
                await stream.aclose()
            error = _api_error(e)
            if error.status in (400, 404, 413, 429):
                front.rejected += 1
            return error.response()

    @staticmethod
    def _prompt(daemon: Coordinator, body: _Sampling) -> Prompt:
        if isinstance(body, ChatCompletionRequest):
            return chat_prompt(daemon, body.to_proto())
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
                raise _ApiError(
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
            return _api_error(e).response()

    async def metrics(self, request: Request) -> Response:
        """The Prometheus metrics (behind the token, when one is set)."""
        try:
            self._check_token(request)
        except _ApiError as e:
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


class _Reply:
    """One generation's chunks as an OpenAI response: a whole object or its events."""

    def __init__(
        self, request_id: str, model: str, body: _Sampling, tokenizer: Tokenizer, index: int
    ) -> None:
        self.tokenizer, self.index = tokenizer, index
        self._generated = b""  # the completions API's text so far, for text_offset
        self.chat = isinstance(body, ChatCompletionRequest)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.model, self.created = model, int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def _envelope(self, choices: list[dict], streaming: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if streaming and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"mtpd-{__version__}",
            "choices": choices,
        }

    def _choice(self, text: str | None, finish: str | None, streaming: bool) -> dict:
        choice: dict[str, Any] = {"index": self.index}
        if self.chat and streaming:
            choice["delta"] = {} if text is None else {"content": text}
        elif self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        return choice

    def _logprobs(self, logprobs: Sequence[api.TokenLogprob]) -> dict | None:
        """Chat's `{"content": [...]}` or the completions API's parallel lists. A token's
        text is its own decoding (a piece of a character decodes to U+FFFD; its bytes
        then are those of that text)."""
        if not logprobs:
            return None
        text = self._token_text
        if self.chat:
            return {
                "content": [
                    {
                        **self._token_entry(e.token_id, e.logprob),
                        "top_logprobs": [
                            self._token_entry(t, lp)
                            for t, lp in zip(e.top_token_ids, e.top_logprobs, strict=True)
                        ],
                    }
                    for e in logprobs
                ]
            }
        tokens = [text(e.token_id) for e in logprobs]
        offsets = []
        for e in logprobs:  # where each token's text begins: whole characters before it
            offsets.append(len(self._generated.decode(errors="ignore")))
            self._generated += self.tokenizer.token_bytes(e.token_id)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in logprobs],
            "top_logprobs": [
                {text(t): lp for t, lp in zip(e.top_token_ids, e.top_logprobs, strict=True)}
                for e in logprobs
            ],
            "text_offset": offsets,
        }

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode(errors="replace")

    def _token_entry(self, token_id: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token_id)
        return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

    @staticmethod
    def _calls(calls: list[api.ToolCall], first_index: int = 0, streaming: bool = False) -> list:
        """Calls as OpenAI sends them: a streamed call whole in one delta, at its index."""
        return [
            {
                **({"index": first_index + i} if streaming else {}),
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for i, c in enumerate(calls)
        ]

    async def collect(
        self, first: api.GenerateChunk, rest: AsyncIterator[api.GenerateChunk]
    ) -> tuple[dict, api.GenerateChunk]:
        """This choice, whole, and its last chunk (for the usage)."""
        chunks = [first]
        async with contextlib.aclosing(rest):
            while not chunks[-1].finish_reason:
                chunks.append(await anext(rest))
        last = chunks[-1]
        text = "".join(c.text for c in chunks)
        calls = [call for c in chunks for call in c.tool_calls]
        reasoning = "".join(c.reasoning_text for c in chunks)
        choice = self._choice(
            text or None if calls else text, FINISH_NAMES[last.finish_reason], False
        )
        if self.chat and reasoning:
            choice["message"]["reasoning_content"] = reasoning
        if self.chat and calls:
            choice["message"]["tool_calls"] = self._calls(calls)
        choice["logprobs"] = self._logprobs([e for c in chunks for e in c.logprobs])
        return choice, last

    async def choice_events(
        self, first: api.GenerateChunk, rest: AsyncIterator[api.GenerateChunk]
    ) -> AsyncIterator[bytes | api.GenerateChunk]:
        """This choice's events, then its last chunk (for the usage)."""

        def event(choice: dict) -> bytes:
            out = self._envelope([choice], True)
            if self.include_usage:
                out["usage"] = None
            return _event(out)

        if self.chat:  # the role first, as OpenAI sends it
            opening = self._choice("", None, streaming=True)
            opening["delta"]["role"] = "assistant"
            yield event(opening)
        calls = 0
        async with contextlib.aclosing(rest):
            chunk = first
            while True:
                if chunk.reasoning_text:
                    reasoning = self._choice(None, None, streaming=True)
                    reasoning["delta"]["reasoning_content"] = chunk.reasoning_text
                    yield event(reasoning)
                if chunk.text or chunk.logprobs:
                    content = self._choice(chunk.text, None, streaming=True)
                    content["logprobs"] = self._logprobs(chunk.logprobs)
                    yield event(content)
                if chunk.tool_calls:
                    called = self._choice(None, None, streaming=True)
                    called["delta"]["tool_calls"] = self._calls(
                        list(chunk.tool_calls), calls, streaming=True
                    )
                    calls += len(chunk.tool_calls)
                    yield event(called)
                if chunk.finish_reason:
                    break
                chunk = await anext(rest)
        yield event(self._choice(None, FINISH_NAMES[chunk.finish_reason], streaming=True))
        yield chunk


async def _events(
    replies: list[_Reply],
    firsts: list[api.GenerateChunk],
    rests: list[AsyncIterator[api.GenerateChunk]],
) -> AsyncIterator[bytes]:
    """The choices' events as they come (interleaved, each at its index), then the usage
    and [DONE]. An error mid-generation is said, then the stream ends."""
    lasts: list[api.GenerateChunk] = []
    merged = _merged(
        [r.choice_events(f, rest) for r, f, rest in zip(replies, firsts, rests, strict=True)]
    )
    try:
        async with contextlib.aclosing(merged):
            async for item in merged:
                if isinstance(item, bytes):
                    yield item
                else:
                    lasts.append(item)
    except Exception as e:  # the pipeline failed mid-generation: say so, then end
        yield _event(_api_error(e).body())
        yield _event("[DONE]")
        return
    if replies[0].include_usage:
        final = replies[0]._envelope([], True)
        final["usage"] = _usage(lasts)
        yield _event(final)
    yield _event("[DONE]")


async def _all_or_none(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Every result, or the first error with the others cancelled and awaited: a choice
    refused (a full queue) or failed must not leave the others running, and the streams
    they read can only be closed once nothing awaits them."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


async def _merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of every stream as they come; one stream's error ends them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    done = object()

    async def pump(stream: AsyncIterator[T]) -> None:
        # Cancelled only by the reader's leaving (below): then no one waits for an end.
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put(item)
        except Exception as e:
            await queue.put(e)
        else:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        running = len(streams)
        while running:
            item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
