"""Continuous batching: which sequences go into the next step, and what their results do.

Every sequence in flight contributes to a step either one decode token or a chunk of its
prompt (prefill in chunks, so a long prompt never stalls the others' decoding). With S
pipeline stages, up to S micro-batches are in flight at once so every stage has work;
the active sequences are spread over them. A sequence is in at most one step at a time,
as its next tokens depend on that step's result; except, on one stage, a lookahead: a
plain decoding step sent while the one before it runs, whose token the worker supplies
(`_can_follow`).

Over 400 lines on purpose: admission, batching, step building, results and recovery
(replay, quarantine) share one lock and one set of sequences, and split apart each would
reach into the others' state. What has its own state lives apart: a request as its
caller holds it (`request.py`), a sequence (`sequence.py`), prefix caching's account
(`prefix_cache.py`), the draft policy (`draft_policy.py`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from mtpd.daemon.draft_policy import DraftPolicy, DraftStats
from mtpd.daemon.pipeline import Pipeline, PipelineRestarting, StepOutcome
from mtpd.daemon.prefix_cache import PrefixCache, Retained
from mtpd.daemon.request import (
    Accepted,
    QueueFullError,
    Request,
    RequestFailed,
    RequestQuarantined,
)
from mtpd.daemon.sequence import Sequence
from mtpd.daemon.structured_output import Constraint, ConstraintBroken
from mtpd.model.errors import InvalidParameter
from mtpd.model.sampling_params import SamplingParams
from mtpd.rpc import sampling_to_wire
from mtpd.v1 import worker_pb2 as pb

log = logging.getLogger("mtpd.daemon")


QUARANTINED = (
    "this request made a worker fail twice, the second time alone in its step, so it is "
    "not run again; the other requests go on"
)
MAX_QUARANTINED = 1024  # fingerprints of quarantined requests remembered


class DraftSource(Protocol):
    """Where a step's drafts come from; by default the MTP head's proposals as they are.
    Tests script them to exercise every acceptance length."""

    def __call__(
        self, seq_id: str, history: list[int], proposed: list[int], k: int
    ) -> list[int]: ...


@dataclass(frozen=True)
class StepRecord:
    tokens: tuple[tuple[str, int], ...]  # (sequence id, tokens it sent) per sequence
    outcome: StepOutcome


class Scheduler:
    def __init__(
        self,
        pipeline: Pipeline,
        eos_ids: set[int],
        max_batch_tokens: int = 256,
        max_queue: int = 256,
        policy: DraftPolicy | None = None,
        draft_source: DraftSource | None = None,
        prefix_cache: bool = False,
        lookahead: bool | None = None,
    ) -> None:
        """prefix_cache: keep finished sequences' caches (as many as free slots allow,
        least recently used evicted first) for prompts that begin with their tokens.
        lookahead: on a one-stage pipeline, send a sequence's next plain decoding step
        while its current one runs (`_can_follow`); None: where the daemon has a core
        the step's compute does not use (Pipeline.daemon_core_free)."""
        if max_batch_tokens < max(1, pipeline.state_block):
            raise InvalidParameter(
                f"max_batch_tokens must be >= {max(1, pipeline.state_block)} (a prompt chunk "
                f"of a hybrid model holds whole blocks), got {max_batch_tokens}"
            )
        self.pipeline, self.eos_ids = pipeline, eos_ids
        self.max_batch_tokens, self.max_queue = max_batch_tokens, max_queue
        self.policy = policy or DraftPolicy(0)
        self.draft_source = draft_source
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._in_flight = 0
        self._stopped = False
        self._epoch = pipeline.epoch  # the pipeline's recoveries seen (each one: replay)
        self._quarantined: OrderedDict[bytes, float] = OrderedDict()  # fingerprint: when
        self.prefix_cache = prefix_cache
        # Hybrid models: recurrent states each sequence's workers keep (at most).
        self._state_snapshots = pipeline.cfg.state_snapshots if prefix_cache else 0
        # A lookahead step's token is sampled by the stage that embeds it: one stage. A
        # longer pipeline keeps its stages busy with micro-batches instead.
        if lookahead is None:
            lookahead = pipeline.daemon_core_free
        self.lookahead = lookahead and pipeline.num_stages == 1
        self.prefix = PrefixCache(pipeline.state_block)
        pipeline.add_listener(self._wake)
        # The latest steps, for benchmarks and stats.
        self.recent_steps: deque[StepRecord] = deque(maxlen=4096)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="scheduler")
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------

    def new_request_id(self) -> str:
        """A request id no other request of this daemon has: one id from the API through
        the logs to the workers' sequence."""
        return f"req-{next(self._ids)}"

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        *,
        ignore_eos: bool = False,
        return_logits: bool = False,
        draft_tokens: int | None = None,
        top_logprobs: int | None = None,
        constraint: Constraint | None = None,
        request_id: str | None = None,
    ) -> Request:
        """top_logprobs: None for no log-probabilities, else each token's and the top
        that many tokens' at its position. `constraint`: a fresh matcher the output must
        follow (it is the scheduler's from here on). `request_id`: one new_request_id()
        gave (the API's, which is also the sequence's id on the workers), None for a
        fresh one."""
        if not prompt_ids:
            raise InvalidParameter("prompt is empty", "prompt")
        if max_tokens < 1:
            raise InvalidParameter(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        context = self.pipeline.max_context
        if len(prompt_ids) + max_tokens > context:
            raise InvalidParameter(
                f"prompt of {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceeds "
                f"the context of {context} tokens",
                "max_tokens",
            )
        request = Request(request_id or self.new_request_id(), max_tokens)
        request._wake_scheduler = self._wake
        seq = Sequence(
            request=request,
            params=sampling_to_wire(params),
            history=list(prompt_ids),
            prompt_len=len(prompt_ids),
            max_tokens=max_tokens,
            ignore_eos=ignore_eos,
            return_logits=return_logits,
            draft_tokens=draft_tokens,
            top_logprobs=top_logprobs,
            constraint=constraint,
        )
        with self._cond:
            if self._stopped:
                raise RequestFailed("the scheduler is stopped")
            # The same request again, within the restart window: no second outage (later it
            # runs: a worker killed from outside can quarantine an innocent one). Hashed
            # only while some request is quarantined, so submits stay as cheap.
            when = self._quarantined.get(seq.fingerprint) if self._quarantined else None
            if when is not None and time.monotonic() - when < self.pipeline.cfg.restart_window_s:
                raise RequestQuarantined(
                    "the same prompt and sampling made a worker fail twice before: not run again"
                )
            # The queue holds what cannot start now: free sequence slots are not queue.
            free = max(0, self.pipeline.max_seqs - len(self._active))
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFullError(
                    f"the admission queue is full ({self.max_queue} requests waiting); retry later"
                )
            self._waiting.append(seq)
            self._cond.notify()
        return request

    @property
    def stats(self) -> DraftStats:
        """Server-wide speculative statistics (each step counted once): a copy, as the
        scheduler's thread keeps adding to them."""
        with self._cond:
            return copy.deepcopy(self.policy.server)

    @property
    def retained_caches(self) -> int:
        """Finished sequences whose caches the workers keep (prefix caching)."""
        with self._cond:
            return len(self.prefix)

    def load(self) -> tuple[int, int]:
        """(sequences running, requests waiting for admission)."""
        with self._cond:
            return len(self._active), len(self._waiting)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            stranded = list(self._waiting) + self._active
            self._waiting.clear()
            self._active = []
            # A sequence whose first chunk is in flight holds slots too, as do the caches
            # kept and the ones being taken over.
            held = [s.request.seq_id for s in stranded if s.opened] + self.prefix.forget()
            held += [s.adopting.seq_id for s in stranded if s.adopting is not None]
            self._cond.notify()
        if held:  # the pipeline may outlive this scheduler
            self.pipeline.release(held)
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
                try:
                    steps, batch = self._steps_of(batch)
                    if not batch:
                        continue
                    # A first step (or, after a replay, a first again) opens its sequence.
                    opened = [
                        self._open_of(seq) for seq, _ in batch if not seq.opened or not seq.cached
                    ]
                    for seq, _ in batch:
                        seq.opened = True
                except Exception as e:  # a bug must fail requests, not stop the loop
                    log.exception("building a step failed")
                    self._retire([seq for seq, _ in batch], "error", f"internal error: {e}")
                    continue
                self._in_flight += 1
                follows = [step.follow for step in steps]
                for (seq, n), step in zip(batch, steps, strict=True):
                    seq.in_flight += 1
                    seq.ahead += n
                    seq.followable = step.sample and not step.verify and not step.draft_tokens
            future = self.pipeline.submit(steps, opened=opened)
            future.add_done_callback(
                lambda f, batch=batch, follows=follows: self._complete(batch, follows, f)
            )

    def _steps_of(
        self, batch: list[tuple[Sequence, int]]
    ) -> tuple[list[pb.SequenceStep], list[tuple[Sequence, int]]]:
        """The batch's steps; a sequence whose grammar fails leaves the batch, ended."""
        steps, kept = [], []
        for seq, n in batch:
            try:
                # One in flight already: this is its lookahead (see _next_batch).
                steps.append(
                    self._follow_of(seq, len(batch))
                    if seq.in_flight
                    else self._step_of(seq, n, len(batch))
                )
            except ConstraintBroken as e:
                self._retire([seq], "grammar", f"the request's grammar failed: {e}")
                continue
            kept.append((seq, n))
        return steps, kept

    def _step_of(self, seq: Sequence, n: int, batch: int) -> pb.SequenceStep:
        """A sequence's share of a step: `n` of its pending tokens, and when it is
        decoding, the drafts to verify after them."""
        sample = seq.cached + n == len(seq.history)
        seq.verifying = 0
        step = pb.SequenceStep(
            seq_id=seq.request.seq_id,
            keep=seq.cached,
            token_ids=seq.history[seq.cached : seq.cached + n],
            sample=sample,
            save_state=self._saves_state(seq, n),
        )
        if not sample:
            return step
        remaining = seq.max_tokens - seq.generated
        room = self.pipeline.max_context - seq.cached - n
        if seq.pending == 1:  # decoding: verify the drafts after the last token
            limit = min(remaining - 1, room)
            drafts = seq.proposed[:limit]
            if self.draft_source is not None:
                k = self._drafts_for(seq, limit, batch)
                drafts = self.draft_source(seq.request.seq_id, seq.history, drafts, k)[:limit]
            if seq.constraint is not None:  # a draft the grammar forbids is rejected
                drafts = drafts[: seq.constraint.allowed_drafts(drafts)]
            step.token_ids.extend(drafts)
            step.verify = seq.verifying = len(drafts)
            room -= len(drafts)
        if seq.constraint is not None:
            step.token_mask = seq.constraint.masks(
                step.token_ids[len(step.token_ids) - step.verify :]
            )
        if self.policy.enabled:
            step.draft_tokens = self._drafts_for(seq, min(remaining - 2, room), batch)
        return step

    def _follow_of(self, seq: Sequence, batch: int) -> pb.SequenceStep:
        """A lookahead step: the worker appends the token that the sequence's step in
        flight emits, and samples the next one."""
        seq.verifying = 0
        step = pb.SequenceStep(
            seq_id=seq.request.seq_id, keep=seq.cached + seq.ahead, sample=True, follow=True
        )
        if self.policy.enabled:
            remaining = seq.max_tokens - seq.generated - 1  # the step in flight emits one
            room = self.pipeline.max_context - step.keep - 1
            step.draft_tokens = self._drafts_for(seq, min(remaining - 2, room), batch)
        return step

    def _can_follow(self, seq: Sequence) -> bool:
        """Whether a lookahead step may go after the sequence's one step in flight. That
        step must emit exactly one token and ask for no drafts, so the daemon knows where
        the token goes without its result; then the worker runs the next step right after
        it instead of waiting for the daemon's answer and next step (about 0.5 ms a step
        on a CPU). Not past max_tokens, nor where the daemon must see each token before
        the next step: a grammar's mask, a cancelled request, a suspect's replay. An end
        of sequence costs the step that follows it."""
        return (
            self.lookahead
            and seq.in_flight == 1
            and seq.followable
            and seq.generated + 2 <= seq.max_tokens
            and seq.constraint is None
            and seq.suspect_until is None
            and not seq.request.cancelled
            and seq.cached + seq.ahead < self.pipeline.max_context
        )

    def _open_of(self, seq: Sequence) -> pb.SequenceOpen:
        """The settings a sequence's first step (keep 0) carries to every worker."""
        return pb.SequenceOpen(
            seq_id=seq.request.seq_id,
            sampling=seq.params,
            return_logits=seq.return_logits,
            draft_p_min=self.policy.p_min,
            no_mtp=self._no_mtp(seq),
            prompt_tokens=seq.prompt_len,
            logprobs=seq.top_logprobs is not None,
            top_logprobs=seq.top_logprobs or 0,
            adopt=seq.adopting.seq_id if seq.adopting else "",
        )

    def _no_mtp(self, seq: Sequence) -> bool:
        return seq.draft_tokens == 0 or (seq.draft_tokens is None and not self.policy.enabled)

    def _drafts_for(self, seq: Sequence, limit: int, batch: int) -> int:
        if seq.draft_tokens is not None:
            return max(0, min(seq.draft_tokens, limit))
        return self.policy.choose(seq.request.drafts, limit, batch)

    def _next_batch(self) -> list[tuple[Sequence, int]] | None:
        """Sequences and token counts for the next micro-batch (called under the lock)."""
        self._drop_cancelled()
        if self.pipeline.failure is not None:
            self._fail_everything(self.pipeline.failure)
            return None
        if self.pipeline.recovering:
            return None  # steps would be refused; the pipeline wakes us when it is back
        if self.pipeline.epoch != self._epoch:
            self._replay()
        while self._waiting and len(self._active) < self.pipeline.max_seqs:
            seq = self._waiting.popleft()
            seq.request.admitted_at = time.monotonic()
            self._active.append(seq)
            self._reuse_prefix(seq)
        # One step more than the stages hold when it is some sequence's lookahead.
        following = [s for s in self._active if self._can_follow(s)][: self.max_batch_tokens]
        if self._in_flight >= self.pipeline.num_stages + bool(following):
            return None
        ready = [s for s in self._active if not s.in_flight]
        if not ready and not following:
            return None
        suspect = next((s for s in self._active if s.suspect_until is not None), None)
        if suspect is not None:  # alone, with nothing else in flight: see _suspect
            return (
                None
                if self._in_flight
                else [(suspect, suspect.chunk(self.max_batch_tokens, self.pipeline.state_block))]
            )
        # Spread the active sequences over as many micro-batches as there are stages.
        per_batch = math.ceil(len(self._active) / self.pipeline.num_stages)
        decoding = [s for s in ready if s.pending == 1]
        prefilling = [s for s in ready if s.pending > 1]
        batch = [(seq, 1) for seq in following]
        budget, block = self.max_batch_tokens - len(batch), self.pipeline.state_block
        for seq in decoding + prefilling:
            if budget <= 0 or len(batch) == per_batch:
                break
            n = seq.chunk(budget, block)
            if not n and all(s.pending == 1 for s, _ in batch):
                # A hybrid prompt's chunk is whole blocks: the step's first one gets a block
                # past what decoding left of the budget, or it could wait for as long as
                # others decode.
                n = seq.chunk(block, block)
            if n:
                batch.append((seq, n))
                budget -= n
        return batch or None

    def _saves_state(self, seq: Sequence, n: int) -> bool:
        """With prefix caching on a hybrid model: the workers save the recurrent state
        after this step of `n` tokens."""
        return self._state_snapshots > 0 and seq.saves_state(n, self.pipeline.state_block)

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Take over the kept cache that shares the longest prefix with the prompt (see
        `PrefixCache.take`); else, with every slot held, evict the least recently kept
        one (called under the lock)."""
        if not len(self.prefix):
            return
        held = len(self._active) + len(self.prefix)
        drafting = not self._no_mtp(seq)
        hit = self.prefix.take(
            seq.history[: seq.prompt_len], drafting, held <= self.pipeline.max_seqs
        )
        if hit is not None:
            seq.adopting, seq.cached = hit, hit.keep
            seq.saved = [p for p in hit.retained.saved if p <= hit.keep]
            seq.request.cached_tokens = hit.keep
        elif held > self.pipeline.max_seqs:
            self.pipeline.release([self.prefix.evict()])

    def _replay(self) -> None:
        """After a worker restart every cache is empty: each running sequence starts over
        from its token history (prompt and accepted tokens), as one long prompt. Greedy
        and seeded sampling depend only on the history, so the output is unchanged."""
        self._epoch = self.pipeline.epoch
        self.prefix.forget()  # every worker's cache starts empty
        replayed = 0
        for seq in self._active:  # their prompts are computed again, whole
            if seq.cached:
                seq.cached, seq.proposed, seq.verifying, seq.saved = 0, [], 0, []
                replayed += 1
            seq.adopting = None
            self.prefix.cached_prompt_tokens -= seq.request.cached_tokens
            seq.request.cached_tokens = 0
        if replayed:
            log.warning("replaying %d sequence(s) after a worker restart", replayed)

    def _fail_everything(self, error: str) -> None:
        """The pipeline cannot run steps for now: no request waits for it."""
        waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            seq.request._finish("error", error)
        if self._active:
            self._retire(list(self._active), "error", error)

    def _suspect(self, batch: list[tuple[Sequence, int]]) -> None:
        """A worker failed while this batch was in the pipeline. Each of its sequences
        becomes a suspect, replayed alone; a suspect that was alone already is the cause,
        and is failed instead of replayed, so one request cannot crash workers forever."""
        alone = len(batch) == 1 and batch[0][0].suspect_until is not None
        for seq, _ in batch:
            if seq not in self._active:
                continue
            if alone:
                log.error("%s: quarantined: it made a worker fail twice", seq.request.seq_id)
                fingerprint = seq.fingerprint
                self._quarantined[fingerprint] = time.monotonic()
                self._quarantined.move_to_end(fingerprint)
                if len(self._quarantined) > MAX_QUARANTINED:
                    self._quarantined.popitem(last=False)
                self._retire([seq], "quarantined", QUARANTINED)
            else:
                seq.suspect_until = len(seq.history) + 2

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.request.cancelled]:
            self._waiting.remove(seq)
            seq.request._finish("cancelled")
        gone = [s for s in self._active if s.request.cancelled and not s.in_flight]
        if gone:
            self._retire(gone, "cancelled")

    def _retire(self, seqs: list[Sequence], reason: str, error: str | None = None) -> None:
        """Finish sequences and free their caches, or with prefix caching keep those of
        the ones that ended well (called under the lock)."""
        keep = self.prefix_cache and reason in ("stop", "length", "cancelled")
        held = []
        for seq in seqs:
            # A cache it was to take over, and may not have:
            if (hit := seq.adopting) is not None:
                if seq.opened:
                    held.append(hit.seq_id)  # its step went out: the cache's fate is unknown
                else:
                    self.prefix.keep(hit.seq_id, hit.retained)  # untouched: kept for others
                seq.adopting = None
            if not seq.opened:
                continue
            # Its steps still in flight, if any, are lookaheads past `cached`: the next
            # step to take the cache over runs after them and drops what they add.
            if keep and seq.cached and seq.suspect_until is None:
                retained = Retained(
                    seq.history[: seq.cached], not self._no_mtp(seq), tuple(seq.saved)
                )
                self.prefix.keep(seq.request.seq_id, retained)
            else:
                held.append(seq.request.seq_id)
        if held:
            self.pipeline.release(held)
        for seq in seqs:
            if seq in self._active:
                self._active.remove(seq)
            seq.request._finish(reason, error)

    def _complete(
        self, batch: list[tuple[Sequence, int]], follows: list[bool], future: Future[StepOutcome]
    ) -> None:
        with self._cond:
            self._in_flight -= 1
            for seq, n in batch:
                seq.in_flight -= 1
                seq.ahead -= n
                seq.followable = seq.followable and seq.in_flight > 0
            try:
                self._take_results(batch, follows, future)
            except Exception as e:  # a bug must fail requests, not wedge the scheduler
                log.exception("taking a step's results failed")
                self._retire(
                    [s for s, _ in batch if s in self._active], "error", f"internal error: {e}"
                )
            self._cond.notify()

    def _take_results(
        self, batch: list[tuple[Sequence, int]], follows: list[bool], future: Future[StepOutcome]
    ) -> None:
        error = future.exception()
        if isinstance(error, PipelineRestarting):
            if error.ran:  # a lookahead failed with the step it followed, which is suspected
                self._suspect([b for b, follow in zip(batch, follows, strict=True) if not follow])
            return  # nothing was applied: the sequences wait for the replay
        if error is not None:
            self._retire([seq for seq, _ in batch if seq in self._active], "error", str(error))
            return
        outcome = future.result()
        self._observe(batch, outcome)
        finished: dict[str, list[Sequence]] = {"stop": [], "length": []}
        for seq, n in batch:
            if seq not in self._active:
                continue  # the scheduler stopped while the step ran
            result = outcome.results.get(seq.request.seq_id)
            if result is None or not result.error:
                seq.adopting = None  # the workers took its cache over, if any
                if self._saves_state(seq, n):  # as every worker counts them
                    seq.saved = [*seq.saved, seq.cached + n][-self._state_snapshots :]
            if result is None:
                seq.cached += n  # a prefill chunk that does not end the prompt
                continue
            if result.error:  # what the checks at the front should have refused
                log.warning("%s: the workers refused it: %s", seq.request.seq_id, result.error)
                self._retire([seq], "error", f"the workers refused this request: {result.error}")
                continue
            try:
                reason = self._accept(seq, n, result)
            except ConstraintBroken as e:
                log.warning("%s: its grammar failed: %s", seq.request.seq_id, e)
                self._retire([seq], "grammar", f"the request's grammar failed: {e}")
                continue
            if reason is not None:
                finished[reason].append(seq)
        for reason, seqs in finished.items():
            if seqs:
                self._retire(seqs, reason)
        for seq, _ in batch:
            if seq.suspect_until is not None and len(seq.history) >= seq.suspect_until:
                seq.suspect_until = None  # past the step it was suspected for

    def _accept(self, seq: Sequence, n: int, result: pb.SequenceResult) -> str | None:
        """Take a step's verified tokens; returns why the sequence ends, if it does."""
        emitted = list(result.token_ids)
        if seq.generated:  # a verification step after the prompt
            seq.request.drafts.add(seq.verifying, result.accepted, len(emitted))
            self.policy.server.add(seq.verifying, result.accepted, len(emitted))
        seq.cached += n + result.accepted
        seq.proposed = list(result.draft_token_ids)
        kept = emitted[: seq.max_tokens - seq.generated]
        end = None
        # A grammar ends at an end of sequence whatever ignore_eos says: nothing follows.
        if not seq.ignore_eos or seq.constraint is not None:
            end = next((i for i, t in enumerate(kept) if t in self.eos_ids), None)
            kept = kept[:end]
        if seq.constraint is not None:
            seq.constraint.consume(kept)
            if seq.constraint.complete:
                end = len(kept)  # only an end-of-sequence token could follow
        self._emit(seq, kept, result)
        if end is not None:
            return "stop"
        return "length" if seq.generated == seq.max_tokens else None

    def _emit(self, seq: Sequence, tokens: list[int], result: pb.SequenceResult) -> None:
        if not tokens:
            return
        seq.history.extend(tokens)
        if seq.return_logits:  # for tests and benchmarks: kept as the wire's bytes
            width = len(result.logits) // len(result.token_ids)
            seq.request.logits.extend(
                result.logits[i * width : (i + 1) * width] for i in range(len(tokens))
            )
        seq.request._emit(
            Accepted(
                tokens, min(result.accepted, len(tokens)), list(result.logprobs[: len(tokens)])
            )
        )

    def _observe(self, batch: list[tuple[Sequence, int]], outcome: StepOutcome) -> None:
        self.recent_steps.append(
            StepRecord(tuple((seq.request.seq_id, n + seq.verifying) for seq, n in batch), outcome)
        )
        for seq, _ in batch:
            if seq in self._active:  # not a lookahead past its end
                seq.request.drafts.add_times(outcome.timings)
        self.policy.server.add_times(outcome.timings)
        # The cost model is about decoding steps; prefill chunks would skew it.
        if all(seq.generated for seq, _ in batch):
            tail = outcome.timings[-1]
            self.policy.observe_step(
                sum(n + seq.verifying for seq, n in batch),
                outcome.cost,
                tail.draft_s,
                tail.draft_catch_up_s,
                tail.draft_passes,
                tail.draft_first_s,
            )
