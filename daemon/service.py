"""The public gRPC service (mtpd.v1.Inference): checks each request, runs it through
`generation.generate`, and turns every failure into a status whose message names the
problem. The daemon keeps serving whatever a request contains."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from mtpd import __version__
from mtpd.daemon.coordinator import Coordinator
from mtpd.daemon.generation import (
    FINISH_NAMES,
    draft_policy_name,
    draft_summary,
    generate,
    render_messages,
)
from mtpd.daemon.options import (
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_REQUEST_ID,
    GenerationOptions,
    defaults_proto,
)
from mtpd.daemon.scheduler import QueueFullError, Request, RequestFailed
from mtpd.model.errors import InputError, InvalidParameter
from mtpd.v1 import inference_pb2 as api
from mtpd.v1 import inference_pb2_grpc as api_grpc

log = logging.getLogger("mtpd.daemon")

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


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
    except RequestFailed as e:
        raise _Refused(grpc.StatusCode.UNAVAILABLE, str(e)) from e


def model_info(daemon: Coordinator, limits: Limits) -> api.ModelInfo:
    policy = daemon.scheduler.policy
    return api.ModelInfo(
        version=__version__,
        model=str(daemon.model_path),
        architecture=daemon.cfg.architecture,
        context_length=daemon.pipeline.max_context,
        vocab_size=daemon.cfg.vocab_size,
        num_layers=daemon.cfg.num_layers,
        workers=[
            api.WorkerShard(
                rank=s.rank,
                device=s.device,
                first_layer=s.first_layer,
                end_layer=s.end_layer,
                pid=s.pid,
            )
            for s in daemon.pipeline.stages
        ],
        mtp_head=daemon.pipeline.mtp_head if policy.enabled else "",
        draft_policy=draft_policy_name(daemon),
        draft_p_min=policy.p_min,
        chat_template=daemon.tokenizer.has_chat_template,
        max_seqs=daemon.pipeline.max_seqs,
        max_queue=daemon.scheduler.max_queue,
        max_request_bytes=limits.max_request_bytes,
        defaults=defaults_proto(),
    )


class InferenceService(api_grpc.InferenceServicer):
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.daemon: Coordinator | None = None  # set once every worker has loaded
        self.started_at = time.monotonic()
        self._ids = itertools.count(1)
        self.requests = self.rejected = self.prompt_tokens = self.completion_tokens = 0
        self.finished: Counter[str] = Counter()
        self.running = 0  # admitted generations not yet ended
        self.draining = False  # shutting down: no new generations

    # -- generation -------------------------------------------------------------------

    async def Generate(
        self, request: api.GenerateRequest | api.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api.GenerateChunk]:
        async with contextlib.aclosing(self._stream(request, context)) as chunks:
            async for chunk in chunks:
                yield chunk

    Chat = Generate  # one path: _prompt_ids tells a ChatRequest from a GenerateRequest

    async def _stream(
        self, request: api.GenerateRequest | api.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api.GenerateChunk]:
        arrived = time.monotonic()
        admitted, reason = False, "error"

        def admit(handle: Request) -> None:
            nonlocal admitted
            admitted = True
            self.requests += 1
            self.running += 1
            # However the call ends (cancelled, deadline, even while gRPC is blocked
            # writing to a slow reader), the request ends with it.
            context.add_done_callback(lambda _: handle.cancel())

        try:
            with _statuses():
                daemon = self._ready()
                if self.draining:
                    raise RequestFailed("mtpd is shutting down: no new requests")
                self._check_size(request)
                request_id = self._request_id(request.request_id)
                options = GenerationOptions.from_proto(request.options)
                prompt_ids = await asyncio.to_thread(self._prompt_ids, daemon, request)
                log.info("%s: %d prompt tokens", request_id, len(prompt_ids))
                generation = generate(daemon, prompt_ids, options, request_id, arrived, admit)
                async with contextlib.aclosing(generation) as chunks:
                    async for chunk in chunks:
                        if chunk.finish_reason:
                            reason = FINISH_NAMES[chunk.finish_reason]
                            self.prompt_tokens += chunk.usage.prompt_tokens
                            self.completion_tokens += chunk.usage.completion_tokens
                        yield chunk
        except _Refused as e:
            if not admitted and e.code != grpc.StatusCode.UNAVAILABLE:
                self.rejected += 1
            await context.abort(e.code, str(e))
        except (asyncio.CancelledError, GeneratorExit):
            reason = "cancelled"  # the caller cancelled, or its deadline passed
            raise
        finally:
            if admitted:
                self.running -= 1
                self.finished[reason] += 1
                log.info("%s: %s, %.2f s", request_id, reason, time.monotonic() - arrived)

    @staticmethod
    def _prompt_ids(
        daemon: Coordinator, request: api.GenerateRequest | api.ChatRequest
    ) -> list[int]:
        tok = daemon.tokenizer
        if isinstance(request, api.ChatRequest):
            return tok.encode(render_messages(tok, request.messages))
        if request.prompt and request.prompt_token_ids:
            raise InvalidParameter("set one of prompt and prompt_token_ids, not both")
        return list(request.prompt_token_ids) or tok.encode(request.prompt)

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
        daemon = self._loaded()
        self._check_size(request)
        if request.text and request.messages:
            raise InvalidParameter("set one of text and messages, not both")
        tok = daemon.tokenizer

        def tokenize() -> tuple[str, list[int]]:
            text = render_messages(tok, request.messages) if request.messages else request.text
            return text, tok.encode(text)

        text, ids = await asyncio.to_thread(tokenize)
        return api.TokenizeReply(token_ids=ids, tokens=[tok.token(i) or "" for i in ids], text=text)

    async def _model_info(self) -> api.ModelInfo:
        return model_info(self._loaded(), self.limits)

    async def _stats(self) -> api.Stats:
        daemon = self._ready()
        try:
            workers = await asyncio.to_thread(daemon.pipeline.worker_stats)
        except grpc.RpcError as e:
            raise RequestFailed(f"a worker did not answer for its stats: {e.details()}") from e
        running, queued = daemon.scheduler.load()
        return api.Stats(
            uptime_s=time.monotonic() - self.started_at,
            requests=self.requests,
            running=running,
            queued=queued,
            rejected=self.rejected,
            finished=dict(self.finished),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            drafts=draft_summary(daemon.scheduler.stats, draft_policy_name(daemon)),
            workers=[
                api.WorkerLoad(
                    rank=rank,
                    cached_sequences=w.active_sequences,
                    max_seqs=w.max_seqs,
                    steps=w.steps,
                    positions=w.tokens,
                    compute_s=w.compute_s,
                    recv_wait_s=w.recv_wait_s,
                    send_s=w.send_s,
                    restarts=daemon.pipeline.restarts[rank],
                )
                for rank, w in enumerate(workers)
            ],
        )

    # -- checks -------------------------------------------------------------------------

    def _loaded(self) -> Coordinator:
        if self.daemon is None:
            raise RequestFailed(
                "the model is still loading; retry when the health check says SERVING"
            )
        return self.daemon

    def _ready(self) -> Coordinator:
        """The daemon, able to generate."""
        daemon = self._loaded()
        if daemon.pipeline.failure is not None:
            raise RequestFailed(f"the pipeline failed: {daemon.pipeline.failure}")
        return daemon

    def _check_size(self, request: object) -> None:
        size = request.ByteSize()
        if size > self.limits.max_request_bytes:
            raise InvalidParameter(
                f"the request is {size} bytes, over the limit of {self.limits.max_request_bytes} "
                f"bytes (mtpd serve --max-request-bytes)"
            )

    def _request_id(self, given: str) -> str:
        if len(given) > MAX_REQUEST_ID:
            raise InvalidParameter(
                f"request_id: at most {MAX_REQUEST_ID} characters, got {len(given)}"
            )
        return given or f"req-{next(self._ids)}"
