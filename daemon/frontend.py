"""What every API of the daemon shares (the gRPC Inference service and the OpenAI HTTP
API): the loaded coordinator, admission, the one request path
(`Frontend.generate`), and the counters behind stats and metrics. Failures are the
daemon's own exceptions; each API maps them onto its statuses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from mtpd import __version__
from mtpd.daemon.coordinator import Coordinator
from mtpd.daemon.generation import (
    FINISH_NAMES,
    Prompt,
    RequestId,
    draft_policy_name,
    draft_summary,
    start,
)
from mtpd.daemon.options import (
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_REQUEST_ID,
    GenerationOptions,
    defaults_proto,
)
from mtpd.daemon.request import Request, RequestFailed
from mtpd.model.errors import InvalidParameter
from mtpd.v1 import inference_pb2 as api

log = logging.getLogger("mtpd.daemon")


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


class RequestTooLarge(InvalidParameter):
    """The request is over --max-request-bytes."""


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


class Frontend:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.daemon: Coordinator | None = None  # set once every worker has loaded
        self.started_at = time.monotonic()
        self.requests = self.rejected = self.prompt_tokens = self.completion_tokens = 0
        self.finished: Counter[str] = Counter()
        self.running = 0  # admitted generations not yet ended
        self.draining = False  # shutting down: no new generations

    def loaded(self) -> Coordinator:
        if self.daemon is None:
            raise RequestFailed(
                "the model is still loading; retry when the health check says SERVING"
            )
        return self.daemon

    def ready(self) -> Coordinator:
        """The daemon, able to generate."""
        daemon = self.loaded()
        if daemon.pipeline.failure is not None:
            raise RequestFailed(f"the pipeline failed: {daemon.pipeline.failure}")
        return daemon

    def status(self) -> str:
        """ok, loading, unavailable (a worker waits for its restart budget) or draining."""
        if self.daemon is None:
            return "loading"
        if self.daemon.pipeline.failure is not None:
            return "unavailable"
        return "draining" if self.draining else "ok"

    def check_size(self, size: int) -> None:
        if size > self.limits.max_request_bytes:
            raise RequestTooLarge(
                f"the request is {size} bytes, over the limit of {self.limits.max_request_bytes} "
                f"bytes (mtpd serve --max-request-bytes)"
            )

    def request_id(self, given: str = "") -> RequestId:
        """A new request's id; `given` is the one its caller sent (checked here)."""
        if len(given) > MAX_REQUEST_ID:
            raise InvalidParameter(
                f"request_id: at most {MAX_REQUEST_ID} characters, got {len(given)}", "request_id"
            )
        if not given.isprintable():  # it goes into the log, one line per event
            raise InvalidParameter("request_id: printable characters only", "request_id")
        own = self.ready().scheduler.new_request_id()
        return RequestId(own, given or own)

    async def generate(
        self,
        prompt: Prompt,
        options: GenerationOptions,
        request_id: RequestId,
        arrived: float,
        on_admitted: Callable[[Request], None] | None = None,
        prompt_field: str = "prompt_token_ids",
        choice: int = 0,
    ) -> AsyncIterator[api.GenerateChunk]:
        """The request path of every API: refuses while loading, failed or draining;
        streams the chunks, the last one with the finish reason; counts what happened.
        Closing the stream early (the caller went away, a deadline) cancels the request,
        which frees its cache on every worker; so does a stop sequence, at once.
        InputError and QueueFullError come only before admission: the API counts them
        in `rejected` as it refuses. `on_admitted` sees the request as soon as the
        scheduler has taken it; `choice` marks the chunks of one of n."""
        reason = "error"
        daemon = self.ready()
        if self.draining:
            raise RequestFailed("mtpd is shutting down: no new requests")
        log.info("%s: %d prompt tokens", request_id, len(prompt.ids))
        generation = await start(daemon, prompt, options, request_id, arrived, prompt_field, choice)
        request = generation.request
        self.requests += 1
        self.running += 1
        try:
            if on_admitted is not None:
                on_admitted(request)
            async for step in request:
                chunk = generation.chunk(step)
                if generation.stopped:
                    request.cancel()  # at once: nothing after a stop sequence is wanted
                yield chunk
                if generation.stopped:
                    break
            last = generation.last_chunk()
            reason = FINISH_NAMES[last.finish_reason]
            self.prompt_tokens += last.usage.prompt_tokens
            self.completion_tokens += last.usage.completion_tokens
            yield last
        except (asyncio.CancelledError, GeneratorExit):
            if reason == "error":  # not after the last chunk, which a caller may not await
                reason = "cancelled"  # the caller went away, or its deadline passed
            raise
        finally:
            if not request.done:
                request.cancel()
            self.running -= 1
            self.finished[reason] += 1
            log.info("%s: %s, %.2f s", request_id, reason, time.monotonic() - arrived)

    @classmethod
    def around(cls, daemon: Coordinator) -> Frontend:
        """The frontend of a daemon started in this process (`mtpd run`, benchmarks)."""
        front = cls(Limits())
        front.daemon = daemon
        return front

    def generate_here(
        self, prompt: Prompt, options: GenerationOptions
    ) -> AsyncIterator[api.GenerateChunk]:
        """A request through the one request path, from this process, arriving now."""
        return self.generate(prompt, options, self.request_id(), time.monotonic())

    def model_info(self) -> api.ModelInfo:
        return model_info(self.loaded(), self.limits)

    async def stats(self) -> api.Stats:
        daemon = self.ready()
        try:
            workers = await asyncio.to_thread(daemon.pipeline.worker_stats)
        except grpc.RpcError as e:
            raise RequestFailed(f"a worker did not answer for its stats: {e.details()}") from e
        except ValueError as e:  # its channel closed: the worker is being replaced
            raise RequestFailed("a worker is being restarted; ask again") from e
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
            prefix_caches=daemon.scheduler.retained_caches,
            cached_prompt_tokens=daemon.scheduler.prefix.cached_prompt_tokens,
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
