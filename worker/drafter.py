"""The MTP head on the tail: its KV cache, built from verified trunk states only, and
greedy drafting.

The head's entry at position p is computed from the trunk's final-normed hidden state
at p and the token at p + 1, so it exists once p + 1 is known. After each step the
head runs over the newly verified positions (draft-time entries were discarded), and
its state at the last one predicts the first draft; further drafts run the head
recursively on its own output, and those entries are discarded again after drafting.
A prefill chunk's last position waits (its hidden state kept) until the next chunk
brings the token after it.

The head's cache is caught up lazily: while a sequence drafts nothing, its new entries
are only kept (their hidden rows and next tokens), and the head runs over all of them
in the pass of the next step that drafts, or once MAX_DEFERRED have gathered. A step
that does not draft then costs the trunk alone, which is what lets `auto` turn drafting
off without paying for the head; the entries, and so the drafts, are the same.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from mtpd.model.mtp import HeadPass, MTPHead

MAX_DEFERRED = 256  # entries (hidden rows) a sequence may hold back from the head
# A step's hidden states are held by reference (no copy) when it has at most this many
# rows: right after the trunk has streamed its weights through every cache, the first
# torch op of a kind costs 30-40 us, and a copy per step cost a one-sequence int4 step
# 1%. A larger step's rows are copied, and a sequence's blocks are merged into one once
# it holds _MAX_BLOCKS, so a sequence pins at most that many steps' states of this many
# rows and one merged block (about 3 MB for the default model), even kept unreleased
# for prefix caching.
_SHARE_ROWS = 64
_MAX_BLOCKS = 16


@dataclass
class Rows:
    """`count` hidden rows of `states` from row `first`, in position order."""

    states: torch.Tensor
    first: int
    count: int

    def tensor(self) -> torch.Tensor:
        return self.states[self.first : self.first + self.count]


@dataclass
class _Held:
    """A sequence's entries kept back from the head: hidden rows (blocks in position
    order) and each row's next token."""

    blocks: list[Rows] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def keep(self, n: int) -> None:
        """Only the first `n` entries. Called every step: nothing to cut is the usual
        case, and costs nothing (walking 200 held rows took 0.2 ms, 3% of a step)."""
        excess = len(self.tokens) - n
        if excess <= 0:
            return
        del self.tokens[n:]
        while excess > 0:
            last = self.blocks.pop()
            if last.count > excess:
                self.blocks.append(Rows(last.states, last.first, last.count - excess))
            excess -= last.count


@dataclass
class Advance:
    """One sequence's verified positions in this step."""

    seq_id: str
    keep: int  # the step's first position
    first_token: int  # the token at `keep`
    hidden: Rows  # m final-normed trunk states, at keep .. keep + m - 1
    next_tokens: list[int]  # tokens at keep + 1 .. : m of them, or m - 1 if not yet known
    want: int = 0  # drafts wanted
    p_min: float = 0.0
    drafts: list[int] = field(default_factory=list)


class Drafter:
    def __init__(self, head: MTPHead, max_seqs: int, max_context: int) -> None:
        self.head = head
        self.cache = head.new_cache(max_seqs, max_context)
        # The hidden state at the position after the (deferred) entries, whose next token
        # is not known yet.
        self._waiting: dict[str, torch.Tensor] = {}
        # Entries not yet run through the head, in position order after the cache's.
        self._deferred: dict[str, _Held] = {}
        # Sequences whose head cache fell out of step with the trunk's (only after a
        # rollback the protocol never makes): no drafts until they restart at 0.
        self._lost: set[str] = set()
        # The last advance's: passes run, the catch-up's seconds in them, and the first
        # pass's seconds (over every verified row, and the first drafts; the rest run a
        # row per sequence drafting on).
        self.passes = 0
        self.catch_up_s = self.first_pass_s = 0.0

    def rename(self, old: str, new: str) -> None:
        """`new` takes over what the head holds of `old` (prefix caching)."""
        if self.cache.slot_of(old) is not None:
            self.cache.rename(old, new)
        for held in (self._waiting, self._deferred):
            if old in held:
                held[new] = held.pop(old)
        if old in self._lost:
            self._lost.discard(old)
            self._lost.add(new)

    def release(self, seq_id: str) -> None:
        self.cache.release(seq_id)
        self._waiting.pop(seq_id, None)
        self._deferred.pop(seq_id, None)
        self._lost.discard(seq_id)

    def advance(self, items: list[Advance]) -> None:
        """Add the verified entries of every item, then draft for those that want it
        (filling `item.drafts`)."""
        started = time.monotonic()
        self.passes, self.catch_up_s, self.first_pass_s, held_rows = 0, 0.0, 0.0, 0
        hidden, tokens, slots, counts, live = [], [], [], [], []
        # Rows held back from a step too large to stay pinned by a few of its rows:
        # copied after the loop, all in one go.
        to_copy: list[Rows] = []
        for item in items:
            slot, rows, row_tokens = self._new_entries(item)
            held = self._deferred.get(item.seq_id)
            total = len(row_tokens) + (len(held.tokens) if held else 0)
            if not item.want and total < MAX_DEFERRED:
                # Kept until a step drafts: the head need not run for it now.
                if row_tokens:
                    if held is None:
                        self._deferred[item.seq_id] = held = _Held()
                    held.blocks += rows
                    held.tokens += row_tokens
                    if len(held.blocks) > _MAX_BLOCKS:  # a copy now and then
                        merged = torch.cat([b.tensor() for b in held.blocks])
                        held.blocks = [Rows(merged, 0, merged.shape[0])]
                    else:
                        to_copy += [r for r in rows if r.states.shape[0] > _SHARE_ROWS]
                continue
            if not total:
                continue
            if held is not None:
                del self._deferred[item.seq_id]
                held_rows += len(held.tokens)
                rows = held.blocks + rows
                row_tokens = held.tokens + row_tokens
            hidden += [r.tensor() for r in rows]
            tokens += row_tokens
            slots.append(slot)
            counts.append(total)
            # The last verified state predicts the first draft once its next token is known.
            if item.want and len(item.next_tokens) == item.hidden.count:
                live.append((item, len(counts) - 1))
        if to_copy:
            block, at = torch.cat([r.tensor() for r in to_copy]), 0
            for r in to_copy:
                r.states, r.first = block, at
                at += r.count
        if not counts:
            return
        ends = list(itertools.accumulate(counts))
        first = self.head.forward_and_draft(
            hidden[0] if len(hidden) == 1 else torch.cat(hidden),  # one: a view, no copy
            torch.tensor(tokens, dtype=torch.long, device=self.head.embedding.device),
            self.cache,
            slots,
            counts,
            [ends[i] - 1 for _, i in live],
            any(item.p_min > 0 for item, _ in live),
        )
        self.passes = 1
        # The held rows' share of the part of the pass that grows with its rows, as if it
        # grew in proportion (it grows more slowly): what drafting again costs for having
        # paused, not what a draft does. (On CUDA the pass is only queued by now: its
        # share reads as nearly 0.)
        self.catch_up_s = first.rows_s * held_rows / len(tokens)
        if live:
            self._draft(live, first, slots, started)
        else:
            self.first_pass_s = time.monotonic() - started

    def _new_entries(self, item: Advance) -> tuple[int, list[Rows], list[int]]:
        """The sequence's cache slot, and the hidden rows and next tokens of the entries
        `item` adds after the cache's and the deferred ones (which it first cuts back to
        the step's `keep`)."""
        slot = self.cache.slot(item.seq_id)
        waiting = self._waiting.pop(item.seq_id, None)
        length = self._cut(item.seq_id, slot, item.keep)
        rows: list[Rows] = []
        tokens: list[int] = []
        if item.keep == 0:
            self._lost.discard(item.seq_id)
        elif item.seq_id in self._lost:
            self._deferred.pop(item.seq_id, None)
            return slot, [], []
        elif length == item.keep:
            pass
        elif length == item.keep - 1 and waiting is not None:
            rows.append(Rows(waiting[None], 0, 1))
            tokens.append(item.first_token)
        else:
            self._lost.add(item.seq_id)
            self._deferred.pop(item.seq_id, None)
            return slot, [], []
        known, h = len(item.next_tokens), item.hidden
        if known < h.count:
            self._waiting[item.seq_id] = h.states[h.first + known].clone()
        if known:
            rows.append(Rows(h.states, h.first, known))
        tokens.extend(item.next_tokens)
        return slot, rows, tokens

    def _cut(self, seq_id: str, slot: int, keep: int) -> int:
        """Entries beyond position `keep` dropped, from the cache and the deferred ones;
        returns how many remain (cached and deferred)."""
        cached = self.cache.lengths[slot]
        if keep <= cached:
            self.cache.truncate(slot, keep)
            self._deferred.pop(seq_id, None)
            return keep
        held = self._deferred.get(seq_id)
        if held is None:
            return cached
        held.keep(keep - cached)
        return cached + len(held.tokens)

    def _draft(
        self,
        live: list[tuple[Advance, int]],
        first: HeadPass,
        slots: list[int],
        started: float,
    ) -> None:
        """Takes the first pass's drafts, and drafts on while items want more."""
        states, drafts, probs, _ = first
        verified = {item.seq_id: self.cache.lengths[slots[i]] for item, i in live}
        # Draft-time entries must fit the cache: positions verified .. verified + k - 2.
        for item, _ in live:
            item.want = min(item.want, self.cache.max_context - verified[item.seq_id] + 1)
        items = [item for item, _ in live]
        item_slots = [slots[i] for _, i in live]
        while True:
            ids = drafts.tolist()
            keep = []
            for row, item in enumerate(items):
                if probs is not None and float(probs[row]) < item.p_min:
                    continue
                item.drafts.append(ids[row])
                if len(item.drafts) < item.want:
                    keep.append(row)
            if self.passes == 1:
                self.first_pass_s = time.monotonic() - started
            if not keep:
                break
            items = [items[r] for r in keep]
            item_slots = [item_slots[r] for r in keep]
            states, drafts, probs, _ = self.head.forward_and_draft(
                states[keep],
                drafts[keep],
                self.cache,
                item_slots,
                [1] * len(keep),
                probabilities=any(item.p_min > 0 for item in items),
            )
            self.passes += 1
        for item, i in live:  # discard the draft-time entries
            self.cache.truncate(slots[i], verified[item.seq_id])
