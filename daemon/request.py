"""A request as its caller holds it: the tokens each step accepts, streamed (sync or
async) through a bounded queue, the final `Result`, cancellation, and the errors a
request can end with. The scheduler (`daemon/scheduler.py`) fills it."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from mtpd.daemon.draft_policy import DraftStats
from mtpd.daemon.structured_output import ConstraintBroken
from mtpd.model.errors import InputError
from mtpd.v1 import worker_pb2 as pb


class QueueFullError(InputError):
    """The admission queue is at its bound; the caller should retry later."""


class RequestFailed(RuntimeError):
    """The pipeline failed while the request ran."""


class RequestQuarantined(RequestFailed):
    """The request made a worker fail twice, the second time alone: it is not run again."""


@dataclass
class Result:
    token_ids: list[int]
    # "stop" | "length" | "cancelled" | "error" | "quarantined" | "grammar" (it failed)
    finish_reason: str
    # Per generated token, when asked for: its float32 logits as little-endian bytes
    # (mtpd.model.compare.logit_rows makes them tensors).
    logits: list[bytes]
    error: str | None = None
    drafts: DraftStats = field(default_factory=DraftStats)


@dataclass(frozen=True)
class Accepted:
    """The tokens one step accepted for a request."""

    token_ids: list[int]
    drafts: int  # how many of them were MTP drafts the verification accepted
    logprobs: list[pb.EmittedLogprobs] = field(default_factory=list)  # when asked, one each


class Request:
    """A caller's handle: iterate it (or `async for` over it) for the tokens each step
    accepts, or wait for `result()`."""

    def __init__(self, seq_id: str, max_tokens: int) -> None:
        self.seq_id = seq_id
        # Bounded by construction: every step emits a token, so at most max_tokens
        # steps' tokens and one end marker.
        self._events: queue.Queue[Accepted | None] = queue.Queue(maxsize=max_tokens + 1)
        self._done = threading.Event()
        self._listener: Callable[[], None] | None = None  # wakes an async reader
        self._wake_scheduler: Callable[[], None] = lambda: None
        self.cancelled = False
        self.submitted_at = time.monotonic()
        self.admitted_at: float | None = None  # when it joined the running sequences
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.token_ids: list[int] = []
        self.logits: list[bytes] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.drafts = DraftStats()
        self.cached_tokens = 0  # prompt tokens whose cache an earlier request left

    def __iter__(self) -> Iterator[Accepted]:
        while (step := self._events.get()) is not None:
            yield step
        self._raise_error()

    async def __aiter__(self) -> AsyncIterator[Accepted]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._listener = lambda: loop.call_soon_threadsafe(ready.set)
        while True:
            ready.clear()  # before looking, so a put after the look sets it again
            try:
                step = self._events.get_nowait()
            except queue.Empty:
                await ready.wait()
                continue
            if step is None:
                break
            yield step
        self._raise_error()

    def _raise_error(self) -> None:
        if self.error is None:
            return
        if self.finish_reason == "grammar":  # the caller's grammar, not the server, failed
            raise ConstraintBroken(self.error)
        kind = RequestQuarantined if self.finish_reason == "quarantined" else RequestFailed
        raise kind(self.error)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.seq_id} still running after {timeout} s")
        reason = self.finish_reason or "error"
        return Result(list(self.token_ids), reason, self.logits, self.error, self.drafts)

    def cancel(self) -> None:
        """Stop generating; the sequence's cache is freed on every worker."""
        self.cancelled = True
        self._wake_scheduler()

    def _emit(self, step: Accepted) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.token_ids.extend(step.token_ids)
        self._put(step)

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.monotonic()
        self._put(None)
        self._done.set()

    def _put(self, event: Accepted | None) -> None:
        self._events.put(event)
        if self._listener is not None:
            with contextlib.suppress(RuntimeError):  # the reader's event loop is gone
                self._listener()
