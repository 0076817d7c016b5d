"""One pipeline stage: a loaded layer shard, its KV cache, and how it runs a step.

Every worker receives every step's control message (sequence ids, cache lengths,
token ids) from the daemon; only activations move worker to worker. The checks that
refuse a sequence depend only on state every worker shares (cache lengths and the step
itself), so all stages refuse the same sequences before any compute and the data plane
stays in lockstep: a refused sequence touches neither its cache nor the transport, and
the step's other sequences run. No request's content can make a worker fail.

Over 400 lines on purpose: a step's checks, its compute and the tail's verification
work on one step's state (its runs, their settings, masks and caches); split apart,
each part would take that state apart again.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mtpd.model.decoder import DecoderShard
from mtpd.model.errors import InputError
from mtpd.model.kv_cache import KVCache
from mtpd.model.mtp import MTPHead
from mtpd.model.sampling import masked, token_mask
from mtpd.model.sampling_params import SamplingParams
from mtpd.rpc import sampling_from_wire
from mtpd.v1 import worker_pb2 as pb
from mtpd.worker.cuda_graphs import StepGraphs
from mtpd.worker.drafter import Advance, Drafter, Rows
from mtpd.worker.faults import fault_from_env
from mtpd.worker.host_copy import PinnedStaging
from mtpd.worker.transport import DistLink, decode, encode
from mtpd.worker.verify import verify

log = logging.getLogger("mtpd.worker")

MAX_DRAFT_TOKENS = 16
# Host staging for the tail's logits and relayed activations: 64 MiB of float32 holds
# the logits of 100 verified rows of a 152k vocabulary; larger copies go unpinned.
PINNED_ELEMENTS = 16 * 2**20


MAX_TOP_LOGPROBS = 20  # as OpenAI bounds top_logprobs


def add_logprobs(
    result: pb.SequenceResult, rows: torch.Tensor, emitted: list[int], top: int
) -> None:
    """Each emitted token's log-probability from its row of logits (before any sampling
    parameter), and the `top` most likely tokens' there."""
    logprobs = torch.log_softmax(rows.float(), -1)
    best = logprobs.topk(min(top, logprobs.shape[-1]), -1) if top else None
    chosen = logprobs.gather(-1, torch.tensor(emitted)[:, None])[:, 0].tolist()
    for j, logprob in enumerate(chosen):
        entry = result.logprobs.add(logprob=logprob)
        if best is not None:
            entry.top_ids.extend(best.indices[j].tolist())
            entry.top_logprobs.extend(best.values[j].tolist())


class StepRefused(InputError):
    """A step that cannot run as sent (unknown cache length, over the context)."""


@dataclass(frozen=True)
class SequenceSettings:
    """What a sequence's SequenceOpen set, validated."""

    sampling: SamplingParams
    return_logits: bool
    draft_p_min: float
    no_mtp: bool
    prompt_tokens: int
    top_logprobs: int | None  # None: no log-probabilities; else how many top tokens


@dataclass
class StageStats:
    steps: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    recv_wait_s: float = 0.0
    send_s: float = 0.0


class Stage:
    def __init__(
        self,
        shard: DecoderShard,
        cache: KVCache,
        rank: int,
        world_size: int,
        link: DistLink | None,
        mtp: MTPHead | None = None,
        graphs: StepGraphs | None = None,
    ) -> None:
        self.shard, self.cache, self.rank, self.world_size, self.link = (
            shard,
            cache,
            rank,
            world_size,
            link,
        )
        self.graphs = graphs
        self.host = PinnedStaging(PINNED_ELEMENTS)
        self.is_first, self.is_tail = rank == 0, rank == world_size - 1
        self.drafter = (
            Drafter(mtp, cache.max_seqs, cache.max_context)
            if mtp is not None and self.is_tail
            else None
        )
        # The tail keeps each sequence's cached token ids: sampling needs the position
        # and the history (repetition penalty).
        self.tokens: dict[str, list[int]] = {}
        # The tail's last emitted token of each sequence and its position: what a
        # lookahead step (SequenceStep.follow) appends.
        self.emitted: dict[str, tuple[int, int]] = {}
        # Every stage holds each running sequence's settings (one entry per cache slot
        # at most), so that every stage refuses the same sequences.
        self.settings: dict[str, SequenceSettings] = {}
        self.stats = StageStats()
        self.fault = fault_from_env()

    @property
    def active_sequences(self) -> int:
        return self.cache.max_seqs - self.cache.free_slots

    def _check(
        self, req: pb.StepRequest
    ) -> tuple[
        list[pb.SequenceStep],
        list[SequenceSettings],
        dict[str, torch.Tensor],
        dict[str, str],
        list[tuple[str, str]],
    ]:
        """The sequences that run, their settings, the allowed tokens of those whose
        grammar constrains them (decoded once, here), why each other one is refused, and
        the (old, new) sequence of each cache taken over by one that runs. Only a
        malformed step (a sequence twice) is refused whole."""
        for kind, ids in (("sequence", [s.seq_id for s in req.sequences]),
                          ("opened sequence", [o.seq_id for o in req.open])):  # fmt: skip
            if len(set(ids)) < len(ids):
                twice = next(i for i in ids if ids.count(i) > 1)
                raise StepRefused(f"{kind} {twice!r} appears twice in step {req.step_id}")
        opened = {o.seq_id: o for o in req.open}
        # Slots are taken in step order; the released ones are free first. Stages may hold
        # more slots than others (they are sized by each one's memory), so the daemon
        # never sends more sequences than the smallest holds: then no stage refuses one
        # for want of a slot, and none differs from another.
        released = set(req.release)
        free = self.cache.free_slots + sum(1 for i in released if self.cache.slot_of(i) is not None)
        # A cache in another role in this step (released, stepped, taken over) is no
        # cache to take over.
        taken = released | {s.seq_id for s in req.sequences}
        runs, settings, masks, refused, adoptions = [], [], {}, {}, []
        for s in req.sequences:
            slot = None if s.seq_id in released else self.cache.slot_of(s.seq_id)
            adopt = opened[s.seq_id].adopt if s.seq_id in opened else ""
            try:
                if adopt:
                    slot = self._adoptable(adopt, slot, taken)
                    taken.add(adopt)
                if s.follow:
                    self._follow(s)
                allowed = self._check_sequence(s, slot)
                held = self._settings_of(s.seq_id, opened.get(s.seq_id), slot)
                if slot is None:
                    if not free:
                        raise StepRefused(
                            f"KV cache full: all {self.cache.max_seqs} sequence slots in use"
                        )
                    free -= 1
            except StepRefused as e:
                refused[s.seq_id] = f"sequence {s.seq_id!r}: {e}"
                continue
            runs.append(s)
            settings.append(held)
            if allowed is not None:
                masks[s.seq_id] = allowed
            if adopt:
                adoptions.append((adopt, s.seq_id))
        return runs, settings, masks, refused, adoptions

    def _adoptable(self, adopt: str, slot: int | None, taken: set[str]) -> int:
        """The slot of the sequence a new one adopts (prefix caching)."""
        held = self.cache.slot_of(adopt)
        if slot is not None:
            raise StepRefused(f"adopts {adopt!r} but holds a cache slot already")
        if held is None or adopt in taken:
            raise StepRefused(f"adopts {adopt!r}, which holds no cache to take over")
        return held

    def _follow(self, s: pb.SequenceStep) -> None:
        """Gives a lookahead step its token: the one this worker emitted at `keep`."""
        if not (self.is_first and self.is_tail):
            raise StepRefused("follow needs a one-stage pipeline (its first stage the tail)")
        if s.token_ids or s.verify or s.token_mask or not s.sample:
            raise StepRefused("a follow step carries no token ids, drafts or mask, and samples")
        position, token = self.emitted.get(s.seq_id, (-1, 0))
        if position != s.keep:
            raise StepRefused(f"follow at {s.keep}, where its previous step emitted no token")
        s.token_ids.append(token)

    def _check_sequence(self, s: pb.SequenceStep, slot: int | None) -> torch.Tensor | None:
        """Refuses what cannot run; returns the step's allowed tokens, if it has a mask."""
        if not s.token_ids:
            raise StepRefused("no token ids to append")
        vocab = self.shard.cfg.vocab_size
        if min(s.token_ids) < 0 or max(s.token_ids) >= vocab:
            bad = next(t for t in s.token_ids if not 0 <= t < vocab)
            raise StepRefused(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if slot is None and s.keep:
            raise StepRefused(f"keep {s.keep} beyond its 0 cached positions")
        problem = None if slot is None else self.cache.keep_error(slot, s.keep)
        if problem:
            raise StepRefused(problem)
        if s.keep + len(s.token_ids) > self.cache.max_context:
            raise StepRefused(
                f"would reach {s.keep + len(s.token_ids)} positions, beyond the cache's max "
                f"context of {self.cache.max_context}"
            )
        if s.verify >= len(s.token_ids) or (s.verify and not s.sample):
            raise StepRefused(
                f"{s.verify} drafts to verify need a token before them and sample set"
            )
        if s.draft_tokens > MAX_DRAFT_TOKENS:
            raise StepRefused(
                f"draft_tokens {s.draft_tokens} above the maximum of {MAX_DRAFT_TOKENS}"
            )
        if not s.token_mask:
            return None
        if not s.sample:
            raise StepRefused("a token_mask without sample")
        try:
            return token_mask(s.token_mask, s.verify + 1, vocab)
        except InputError as e:
            raise StepRefused(str(e)) from e

    def _settings_of(
        self, seq_id: str, opened: pb.SequenceOpen | None, slot: int | None
    ) -> SequenceSettings:
        """The settings this step opens the sequence with, else those it holds."""
        if opened is None:
            held = None if slot is None else self.settings.get(seq_id)
            if held is None:
                raise StepRefused("not opened: its first step carries its settings")
            return held
        try:
            sampling = sampling_from_wire(opened.sampling)
            sampling.check_vocab(self.shard.cfg.vocab_size)
        except InputError as e:
            raise StepRefused(str(e)) from e
        if not math.isfinite(opened.draft_p_min):
            raise StepRefused(f"draft_p_min {opened.draft_p_min} is not a number")
        if opened.top_logprobs > MAX_TOP_LOGPROBS:
            raise StepRefused(f"top_logprobs {opened.top_logprobs} above {MAX_TOP_LOGPROBS}")
        return SequenceSettings(
            sampling,
            opened.return_logits,
            opened.draft_p_min,
            opened.no_mtp,
            opened.prompt_tokens,
            opened.top_logprobs if opened.logprobs else None,
        )

    def run(self, req: pb.StepRequest) -> pb.StepReply:
        arrived = time.monotonic()
        reply = pb.StepReply(step_id=req.step_id)
        try:
            runs, settings, masks, refused, adoptions = self._check(req)
        except StepRefused as e:
            reply.error = str(e)
            return reply
        for seq_id, why in refused.items():
            log.warning("step %d: refused %s", req.step_id, why)
            reply.results.add(seq_id=seq_id, error=why)
        self._release(req.release)
        for old, new in adoptions:
            self._adopt(old, new)
        if not runs:
            return reply
        for s, held in zip(runs, settings, strict=True):
            self.settings[s.seq_id] = held
        if self.fault is not None and self.is_first:
            self.fault(runs)
        with torch.inference_mode():
            self._compute(runs, req.activations, settings, masks, reply, arrived)
        return reply

    def _release(self, seq_ids: Iterable[str]) -> None:
        for seq_id in seq_ids:
            self.cache.release(seq_id)
            self.tokens.pop(seq_id, None)
            self.emitted.pop(seq_id, None)
            self.settings.pop(seq_id, None)
            if self.drafter is not None:
                self.drafter.release(seq_id)

    def _adopt(self, old: str, new: str) -> None:
        self.cache.rename(old, new)
        if old in self.tokens:
            self.tokens[new] = self.tokens.pop(old)
        self.emitted.pop(old, None)
        self.settings.pop(old, None)  # the new sequence's own come with its step
        if self.drafter is not None:
            self.drafter.rename(old, new)

    def reset(self, link: DistLink | None) -> None:
        """Forget every sequence and use a new data-plane link (the weights stay)."""
        self._release(self.cache.sequences() + list(self.tokens) + list(self.settings))
        self.link = link

    def _compute(
        self,
        seqs: list[pb.SequenceStep],
        activations: pb.Activations,
        settings: list[SequenceSettings],
        masks: dict[str, torch.Tensor],
        reply: pb.StepReply,
        arrived: float,
    ) -> None:
        slots = [self.cache.slot(s.seq_id) for s in seqs]
        counts = [len(s.token_ids) for s in seqs]
        for slot, s in zip(slots, seqs, strict=True):
            self.cache.truncate(slot, s.keep)
        rows, device = sum(counts), self.shard.device

        if self.is_first:
            ids = [t for s in seqs for t in s.token_ids]
            x = torch.tensor(ids, dtype=torch.long, device=device)
        elif self.link is not None:
            x = self.link.recv(rows, self.shard.input_width, self.shard.dtype)
        else:
            x = decode(activations, rows, self.shard.input_width).to(device)
        input_ready = time.monotonic()

        hidden = None if self.graphs is None else self.graphs.run(x, slots, counts)
        if hidden is None:
            hidden = self.shard(x, self.cache, slots, counts)
        for slot, s in zip(slots, seqs, strict=True):
            if s.save_state:
                self.cache.save_state(slot)
        if self.is_tail:
            self._verify_and_draft(seqs, settings, masks, counts, hidden, reply)
        elif device.type == "cuda":
            torch.cuda.synchronize(device)  # so compute time is not billed to the send
        computed = time.monotonic()

        if not self.is_tail:
            if self.link is not None:
                self.link.send(hidden)
            else:
                reply.activations.CopyFrom(encode(self.host.to_host(hidden)))
        sent = time.monotonic()

        t = reply.timings
        t.arrived_at, t.input_ready_at, t.computed_at, t.sent_at = (
            arrived,
            input_ready,
            computed,
            sent,
        )
        t.compute_s, t.recv_wait_s, t.send_s = (
            computed - input_ready,
            input_ready - arrived,
            sent - computed,
        )
        st = self.stats
        st.steps += 1
        st.tokens += rows
        st.compute_s += t.compute_s
        st.recv_wait_s += t.recv_wait_s
        st.send_s += t.send_s

    def _verify_and_draft(
        self,
        seqs: list[pb.SequenceStep],
        settings: list[SequenceSettings],
        masks: dict[str, torch.Tensor],
        counts: list[int],
        hidden: torch.Tensor,
        reply: pb.StepReply,
    ) -> None:
        starts = [0, *itertools.accumulate(counts)]
        for s in seqs:
            history = self.tokens.setdefault(s.seq_id, [])
            del history[s.keep :]
            history.extend(s.token_ids)
            self.emitted.pop(s.seq_id, None)
        # One LM-head pass over every row that is verified or sampled.
        rows = [
            r
            for i, s in enumerate(seqs)
            if s.sample
            for r in range(starts[i + 1] - 1 - s.verify, starts[i + 1])
        ]
        logits = self.host.to_host(self.shard.logits(_rows_of(hidden, rows))) if rows else None
        advances, row = [], 0
        for i, s in enumerate(seqs):
            history = self.tokens[s.seq_id]
            verified = counts[i]
            result = None
            if s.sample:
                base = s.keep + counts[i] - 1 - s.verify
                n = s.verify + 1
                rows = logits[row : row + n]
                if s.seq_id in masks:
                    rows = masked(rows, masks[s.seq_id])
                emitted = verify(
                    rows,
                    settings[i].sampling,
                    history,
                    base,
                    s.verify,
                    settings[i].prompt_tokens,
                )
                accepted = len(emitted) - 1
                del history[base + accepted + 1 :]  # the rejected drafts
                self.emitted[s.seq_id] = (base + accepted + 1, emitted[-1])
                verified = counts[i] - s.verify + accepted
                result = reply.results.add(seq_id=s.seq_id, token_ids=emitted, accepted=accepted)
                if settings[i].return_logits:
                    result.logits = logits[row : row + len(emitted)].numpy().tobytes()
                if settings[i].top_logprobs is not None:
                    add_logprobs(
                        result, logits[row : row + len(emitted)], emitted, settings[i].top_logprobs
                    )
                row += n
            if self.drafter is not None and not settings[i].no_mtp:
                known = history[s.keep + 1 :] + ([result.token_ids[-1]] if result else [])
                advances.append(
                    Advance(
                        seq_id=s.seq_id,
                        keep=s.keep,
                        first_token=s.token_ids[0],
                        hidden=Rows(hidden, starts[i], verified),
                        next_tokens=known[:verified],
                        want=s.draft_tokens if result else 0,
                        p_min=settings[i].draft_p_min,
                    )
                )
        if self.drafter is None or not advances:
            return
        began = time.monotonic()
        self.drafter.advance(advances)
        reply.timings.draft_s = time.monotonic() - began
        reply.timings.draft_passes = self.drafter.passes
        reply.timings.draft_catch_up_s = self.drafter.catch_up_s
        reply.timings.draft_first_s = self.drafter.first_pass_s
        if not self.drafter.passes:
            return  # nothing drafted (the head only held entries back)
        by_id = {r.seq_id: r for r in reply.results}
        for a in advances:
            if a.drafts:
                by_id[a.seq_id].draft_token_ids.extend(a.drafts)


def _rows_of(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """hidden's `rows`: a view where they run in one stretch (every decoding step's do),
    else a gather. Right after the trunk's weights have streamed through the caches, the
    index tensor and the gather cost a one-row int4 step about 1% (two cold torch ops)."""
    if rows[-1] - rows[0] == len(rows) - 1:
        return hidden[rows[0] : rows[-1] + 1]
    return hidden[torch.tensor(rows, device=hidden.device)]
