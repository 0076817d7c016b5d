"""The public gRPC service (mtpd.v1.Inference): maps each call onto the daemon's
shared request path (`frontend.Frontend`) and every failure onto a status whose message
names the problem. The daemon keeps serving whatever a request contains."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TypeVar

import grpc

from mtpd.daemon.chat import Chat, chat_prompt
from mtpd.daemon.choices import all_or_none, choice_streams, merged
from mtpd.daemon.coordinator import Coordinator
from mtpd.daemon.frontend import Frontend
from mtpd.daemon.generation import Prompt
from mtpd.daemon.options import GenerationOptions
from mtpd.daemon.request import QueueFullError, Request, RequestFailed, RequestQuarantined
from mtpd.model.errors import InputError, InvalidParameter
from mtpd.v1 import inference_pb2 as api
from mtpd.v1 import inference_pb2_grpc as api_grpc

T = TypeVar("T")


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def _statuses() -> Iterator[None]:
    """Map the daemon's exceptions onto gRPC statuses."""
    try:
        yield
    except QueueFullError as e:
        raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e
    except InputError as e:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
    except RequestQuarantined as e:  # not UNAVAILABLE: retrying it would fail again
        raise _Refused(grpc.StatusCode.INTERNAL, str(e)) from e
    except RequestFailed as e:
        raise _Refused(grpc.StatusCode.UNAVAILABLE, str(e)) from e


class InferenceService(api_grpc.InferenceServicer):
    def __init__(self, front: Frontend) -> None:
        self.front = front

    # -- generation -------------------------------------------------------------------

    async def Generate(
        self, request: api.GenerateRequest | api.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api.GenerateChunk]:
        arrived = time.monotonic()

        def admitted(handle: Request) -> None:
            # However the call ends (cancelled, deadline, even while gRPC is blocked
            # writing to a slow reader), the request ends with it.
            context.add_done_callback(lambda _: handle.cancel())

        front = self.front
        try:
            with _statuses():
                front.check_size(request.ByteSize())
                options = GenerationOptions.from_proto(request.options)
                request_id = front.request_id(request.request_id)
                prompt = await asyncio.to_thread(self._prompt, front.ready(), request)
                streams = choice_streams(
                    front, prompt, options, request_id, arrived, admitted, "prompt_token_ids"
                )
                try:
                    # Every choice admitted before the first chunk, or none: a refusal is
                    # then a status.
                    for chunk in await all_or_none(anext(s) for s in streams):
                        yield chunk
                    async with contextlib.aclosing(merged(streams)) as rest:
                        async for chunk in rest:
                            yield chunk
                finally:
                    for stream in streams:
                        await stream.aclose()
        except _Refused as e:
            if e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                front.rejected += 1
            await context.abort(e.code, str(e))

    Chat = Generate  # one path: _prompt tells a ChatRequest from a GenerateRequest

    @staticmethod
    def _prompt(daemon: Coordinator, request: api.GenerateRequest | api.ChatRequest) -> Prompt:
        if isinstance(request, api.ChatRequest):
            structured = request.options.structured_output.WhichOneof("format") is not None
            return chat_prompt(daemon, request, structured)
        if request.prompt and request.prompt_token_ids:
            raise InvalidParameter("set one of prompt and prompt_token_ids, not both", "prompt")
        return Prompt(list(request.prompt_token_ids) or daemon.tokenizer.encode(request.prompt))

    # -- the rest -----------------------------------------------------------------------

    async def Tokenize(
        self, request: api.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> api.TokenizeReply:
        return await self._answer(context, self._tokenize(request))

    async def GetModelInfo(
        self, request: api.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> api.ModelInfo:
        return await self._answer(context, self._model_info())

    async def GetStats(
        self, request: api.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> api.Stats:
        return await self._answer(context, self._stats())

    async def _answer(self, context: grpc.aio.ServicerContext, answer: Awaitable[T]) -> T:
        try:
            with _statuses():
                return await answer
        except _Refused as e:
            await context.abort(e.code, str(e))
            raise  # not reached: abort raises

    async def _tokenize(self, request: api.TokenizeRequest) -> api.TokenizeReply:
        daemon = self.front.loaded()
        self.front.check_size(request.ByteSize())
        if request.text and request.messages:
            raise InvalidParameter("set one of text and messages, not both", "text")
        tok = daemon.tokenizer

        def tokenize() -> tuple[str, list[int]]:
            if request.messages:
                return Chat.from_proto(api.ChatRequest(messages=request.messages)).encode(tok)
            return request.text, tok.encode(request.text)

        text, ids = await asyncio.to_thread(tokenize)
        return api.TokenizeReply(token_ids=ids, tokens=[tok.token(i) or "" for i in ids], text=text)

    async def _model_info(self) -> api.ModelInfo:
        return self.front.model_info()

    async def _stats(self) -> api.Stats:
        return await self.front.stats()
