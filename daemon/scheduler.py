"""Continuous batching: which sequences go into the next step, and what their results do.

Every sequence in flight contributes to a step either one decode token or a chunk of its
prompt (prefill in chunks, so a long prompt never stalls the others' decoding). With S
pipeline stages, up to S micro-batches are in flight at once so every stage has work;
the active sequences are spread over them. A sequence is in at most one step at a time:
its next tokens depend on that step's result.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from mtpd.daemon.pipeline import Pipeline, StepOutcome
from mtpd.model.errors import InputError, InvalidParameter
from mtpd.model.sampling import SamplingParams
from mtpd.v1 import worker_pb2 as pb


class QueueFullError(InputError):
    """The admission queue is at its bound; the caller should retry later."""


class RequestFailed(RuntimeError):
    """The pipeline failed while the request ran."""


@dataclass
class Result:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    logits: list[torch.Tensor]  # per generated token, when asked for
    error: str | None = None


class Request:
    """A caller's handle: iterate it for token ids as they are accepted, or wait for
    `result()`."""

    def __init__(self, seq_id: str, max_tokens: int) -> None:
        self.seq_id = seq_id
        # Bounded by construction: at most max_tokens tokens and one end marker.
        self._events: queue.Queue[int | None] = queue.Queue(maxsize=max_tokens + 1)
        self._done = threading.Event()
        self.cancelled = False
        self.token_ids: list[int] = []
        self.logits: list[torch.Tensor] = []
        self.finish_reason: str | None = None
        self.error: str | None = None

    def __iter__(self) -> Iterator[int]:
        while (token := self._events.get()) is not None:
            yield token
        if self.error is not None:
            raise RequestFailed(self.error)

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.seq_id} still running after {timeout} s")
        return Result(list(self.token_ids), self.finish_reason or "error", self.logits, self.error)

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, token: int) -> None:
        self.token_ids.append(token)
        self._events.put(token)

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._events.put(None)
        self._done.set()


@dataclass(frozen=True)
class StepRecord:
    tokens: tuple[tuple[str, int], ...]  # (sequence id, tokens it sent) per sequence
    outcome: StepOutcome


@dataclass
class _Sequence:
    request: Request
    params: pb.SamplingParams
    history: list[int]  # prompt + accepted tokens
    prompt_len: int
    max_tokens: int
    ignore_eos: bool
    return_logits: bool
    cached: int = 0  # positions every worker holds in its KV cache
    in_flight: bool = False
    generated: int = field(default=0)

    @property
    def pending(self) -> int:
        return len(self.history) - self.cached


class Scheduler:
    def __init__(
        self,
        pipeline: Pipeline,
        eos_ids: set[int],
        max_batch_tokens: int = 256,
        max_queue: int = 256,
    ) -> None:
        if max_batch_tokens < 1:
            raise InvalidParameter(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.pipeline, self.eos_ids = pipeline, eos_ids
        self.max_batch_tokens, self.max_queue = max_batch_tokens, max_queue
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._in_flight = 0
        self._stopped = False
        # The latest steps, for benchmarks and stats.
        self.recent_steps: deque[StepRecord] = deque(maxlen=4096)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="scheduler")
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        *,
        ignore_eos: bool = False,
        return_logits: bool = False,
    ) -> Request:
        if not prompt_ids:
            raise InvalidParameter("prompt is empty")
        if max_tokens < 1:
            raise InvalidParameter(f"max_tokens must be >= 1, got {max_tokens}")
        context = self.pipeline.max_context
        if len(prompt_ids) + max_tokens > context:
            raise InvalidParameter(
                f"prompt of {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceeds "
                f"the context of {context} tokens"
            )
        request = Request(f"seq-{next(self._ids)}", max_tokens)
        seq = _Sequence(
            request=request,
            params=pb.SamplingParams(
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                min_p=params.min_p,
                repetition_penalty=params.repetition_penalty,
                seed=params.seed,
            ),
            history=list(prompt_ids),
            prompt_len=len(prompt_ids),
            max_tokens=max_tokens,
            ignore_eos=ignore_eos,
            return_logits=return_logits,
        )
        with self._cond:
            if self._stopped:
                raise RequestFailed("the scheduler is stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"admission queue full ({self.max_queue} requests waiting)")
            self._waiting.append(seq)
            self._cond.notify()
        return request

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            stranded = list(self._waiting) + self._active
            self._waiting.clear()
            self._active = []
            self._cond.notify()
        for seq in stranded:
            seq.request._finish("error", "the scheduler stopped")
        self._thread.join(timeout=5)

    # -- the loop ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                while batch is None and not self._stopped:
                    self._cond.wait()
                    batch = self._next_batch()
                if self._stopped:
                    return
                self._in_flight += 1
                steps = []
                for seq, n in batch:
                    seq.in_flight = True
                    steps.append(
                        pb.SequenceStep(
                            seq_id=seq.request.seq_id,
                            keep=seq.cached,
                            token_ids=seq.history[seq.cached : seq.cached + n],
                            sample=seq.cached + n == len(seq.history),
                            sampling=seq.params,
                            return_logits=seq.return_logits,
                        )
                    )
            future = self.pipeline.submit(steps)
            future.add_done_callback(lambda f, batch=batch: self._complete(batch, f))

    def _next_batch(self) -> list[tuple[_Sequence, int]] | None:
        """Sequences and token counts for the next micro-batch (called under the lock)."""
        self._drop_cancelled()
        while self._waiting and len(self._active) < self.pipeline.max_seqs:
            self._active.append(self._waiting.popleft())
        if self._in_flight >= self.pipeline.num_stages:
            return None
        ready = [s for s in self._active if not s.in_flight]
        if not ready:
            return None
        # Spread the active sequences over as many micro-batches as there are stages.
        per_batch = math.ceil(len(self._active) / self.pipeline.num_stages)
        decoding = [s for s in ready if s.pending == 1]
        prefilling = [s for s in ready if s.pending > 1]
        batch, budget = [], self.max_batch_tokens
        for seq in decoding + prefilling:
            if budget == 0 or len(batch) == per_batch:
                break
            n = min(seq.pending, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.request.cancelled]:
            self._waiting.remove(seq)
            seq.request._finish("cancelled")
        gone = [s for s in self._active if s.request.cancelled and not s.in_flight]
        if gone:
            self._retire(gone, "cancelled")

    def _retire(self, seqs: list[_Sequence], reason: str, error: str | None = None) -> None:
        """Finish sequences and free their caches (called under the lock)."""
        cached = [s.request.seq_id for s in seqs if s.cached]
        if cached:
            self.pipeline.release(cached)
        for seq in seqs:
            if seq in self._active:
                self._active.remove(seq)
            seq.request._finish(reason, error)

    def _complete(self, batch: list[tuple[_Sequence, int]], future: Future[StepOutcome]) -> None:
        with self._cond:
            self._in_flight -= 1
            error = future.exception()
            for seq, _ in batch:
                seq.in_flight = False
            if error is not None:
                self._retire([seq for seq, _ in batch], "error", str(error))
                self._cond.notify()
                return
            outcome = future.result()
            self.recent_steps.append(
                StepRecord(tuple((seq.request.seq_id, n) for seq, n in batch), outcome)
            )
            finished: dict[str, list[_Sequence]] = {"stop": [], "length": []}
            for seq, n in batch:
                seq.cached += n
                result = outcome.results.get(seq.request.seq_id)
                if result is None:
                    continue  # a prefill chunk that does not end the prompt
                token = result.token_ids[0]
                if token in self.eos_ids and not seq.ignore_eos:
                    finished["stop"].append(seq)
                    continue
                seq.history.append(token)
                seq.generated += 1
                if seq.return_logits:
                    seq.request.logits.append(
                        torch.frombuffer(bytearray(result.logits), dtype=torch.float32)
                    )
                seq.request._emit(token)
                if seq.generated == seq.max_tokens:
                    finished["length"].append(seq)
            for reason, seqs in finished.items():
                if seqs:
                    self._retire(seqs, reason)
            self._cond.notify()
