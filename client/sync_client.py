"""`Client`: the blocking SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mtpd.client.errors import MtpdError, Unavailable, from_rpc_error
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


class Stream:
    """A generation in progress: iterate it for `Delta`s; once it is exhausted,
    `result` holds the whole text, the finish reason, usage and timing. `cancel()` (or
    leaving a `with` block early) stops the generation and frees its cache."""

    def __init__(self, call: grpc.Call) -> None:
        self._call = call
        self.result = GenerationResult()

    def __iter__(self) -> Iterator[Delta]:
        try:
            for chunk in self._call:
                if (delta := self.result.add(chunk)) is not None:
                    yield delta
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.result.done:
            self.cancel()


class Client(CallSettings):
    """Talks to a running `mtpd serve`.

    address: "unix:/path", a socket path, or "host:port"; default $MTPD_ADDRESS, else
    the default socket. token: the API token; default $MTPD_API_TOKEN. timeout:
    seconds for each call (a whole generation included); None waits as long as it
    takes. tls_ca: for a TCP address served with TLS, the PEM certificate to trust;
    default $MTPD_TLS_CA."""

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
            grpc.secure_channel(self.address, self._tls)
            if self._tls
            else grpc.insecure_channel(self.address)
        )
        self._stub = api_grpc.InferenceStub(self._channel)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[Options],
    ) -> GenerationResult:
        """Continue a raw prompt (text or token ids) and return the whole result."""
        return _drain(self.stream(prompt, request_id=request_id, timeout=timeout, **options))

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[Options],
    ) -> Stream:
        request = generate_request(prompt, request_id, options)
        return Stream(self._stub.Generate(request, **self._call(timeout)))

    def chat(
        self,
        messages: Sequence[Message],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[ChatCallOptions],
    ) -> GenerationResult:
        """Reply to the messages; the daemon applies the model's chat template."""
        return _drain(self.chat_stream(messages, request_id=request_id, timeout=timeout, **options))

    def chat_stream(
        self,
        messages: Sequence[Message],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[ChatCallOptions],
    ) -> Stream:
        options, chat = split_chat_options(dict(options))
        request = chat_request(messages, request_id, options, chat)
        return Stream(self._stub.Chat(request, **self._call(timeout)))

    def tokenize(
        self, text: str | None = None, *, messages: Sequence[Message] | None = None
    ) -> list[int]:
        request = api.TokenizeRequest(text=text or "", messages=chat_messages(messages or []))
        return list(self._unary(self._stub.Tokenize, request).token_ids)

    def info(self) -> api.ModelInfo:
        return self._unary(self._stub.GetModelInfo, api.GetModelInfoRequest())

    def stats(self) -> api.Stats:
        return self._unary(self._stub.GetStats, api.GetStatsRequest())

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the daemon's health check says SERVING (the model is loaded)."""
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"mtpd at {self.address} is not serving after {timeout} s")
            time.sleep(0.2)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method, request):
        try:
            return method(request, **self._call(None))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


def _drain(stream: Stream) -> GenerationResult:
    with stream:
        for _ in stream:
            pass
    if not stream.result.done:
        raise MtpdError("the stream ended without a finish reason")
    return stream.result
