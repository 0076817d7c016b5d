"""`AsyncClient`: the asyncio SDK, the same calls as `Client` awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mtpd.client.errors import Cancelled, MtpdError, Unavailable, from_rpc_error
from mtpd.client.messages import (
    CallSettings,
    ChatCallOptions,
    Delta,
    GenerationResult,
    Message,
    Options,
    chat_messages,
    chat_request,
    generate_request,
    split_chat_options,
)
from mtpd.v1 import inference_pb2 as api
from mtpd.v1 import inference_pb2_grpc as api_grpc


class AsyncStream:
    """`async for` it for `Delta`s; then `result` holds the whole generation."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self.result = GenerationResult()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            async for chunk in self._call:
                if (delta := self.result.add(chunk)) is not None:
                    yield delta
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        except asyncio.CancelledError:
            if not self._call.cancelled():
                raise  # the task running us was cancelled
            raise Cancelled(
                "CANCELLED: the stream was cancelled", grpc.StatusCode.CANCELLED
            ) from None

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.result.done:
            self.cancel()


class AsyncClient(CallSettings):
    """As `Client`, for asyncio; use it inside a running event loop."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        timeout: float | None = None,
        tls_ca: str | None = None,
    ) -> None:
        super().__init__(address, token, timeout, tls_ca)
        self._channel = (
            grpc.aio.secure_channel(self.address, self._tls)
            if self._tls
            else grpc.aio.insecure_channel(self.address)
        )
        self._stub = api_grpc.InferenceStub(self._channel)

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[Options],
    ) -> GenerationResult:
        return await _drain(self.stream(prompt, request_id=request_id, timeout=timeout, **options))

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[Options],
    ) -> AsyncStream:
        request = generate_request(prompt, request_id, options)
        return AsyncStream(self._stub.Generate(request, **self._call(timeout)))

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[ChatCallOptions],
    ) -> GenerationResult:
        return await _drain(
            self.chat_stream(messages, request_id=request_id, timeout=timeout, **options)
        )

    def chat_stream(
        self,
        messages: Sequence[Message],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[ChatCallOptions],
    ) -> AsyncStream:
        options, chat = split_chat_options(dict(options))
        request = chat_request(messages, request_id, options, chat)
        return AsyncStream(self._stub.Chat(request, **self._call(timeout)))

    async def tokenize(
        self, text: str | None = None, *, messages: Sequence[Message] | None = None
    ) -> list[int]:
        request = api.TokenizeRequest(text=text or "", messages=chat_messages(messages or []))
        return list((await self._unary(self._stub.Tokenize, request)).token_ids)

    async def info(self) -> api.ModelInfo:
        return await self._unary(self._stub.GetModelInfo, api.GetModelInfoRequest())

    async def stats(self) -> api.Stats:
        return await self._unary(self._stub.GetStats, api.GetStatsRequest())

    async def wait_ready(self, timeout: float = 60.0) -> None:
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"mtpd at {self.address} is not serving after {timeout} s")
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method, request):
        try:
            return await method(request, **self._call(None))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


async def _drain(stream: AsyncStream) -> GenerationResult:
    async with stream:
        async for _ in stream:
            pass
    if not stream.result.done:
        raise MtpdError("the stream ended without a finish reason")
    return stream.result
