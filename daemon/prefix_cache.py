"""Prefix caching's account in the daemon: the finished sequences whose caches the
workers keep, and which of them a new prompt takes over. The scheduler holds one and
acts on its answers (adopting, releasing); the workers only follow its steps.

A cache is taken over whole, by one sequence: the KV cache is one contiguous slot per
sequence (see docs/prefix-caching.md)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Retained:
    """A finished sequence whose cache the workers keep for a later prompt that begins
    with its tokens."""

    tokens: list[int]  # the positions cached
    drafted: bool  # the MTP head's cache holds them too
    saved: tuple[int, ...] = ()  # hybrid models: where a recurrent state was saved


@dataclass(frozen=True)
class Hit:
    seq_id: str  # whose cache is taken over
    retained: Retained
    keep: int  # positions reused


class PrefixCache:
    def __init__(self, state_block: int) -> None:
        """state_block: a hybrid model's recurrent state restarts only where it was saved
        (0: an attention cache is cut anywhere)."""
        self.state_block = state_block
        self._kept: OrderedDict[str, Retained] = OrderedDict()  # least recent first
        self.cached_prompt_tokens = 0  # prompt tokens taken from kept caches
        self.evictions = 0  # kept caches released to free a slot

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, seq_id: str, retained: Retained) -> None:
        self._kept[seq_id] = retained

    def take(self, prompt: list[int], drafting: bool, slot_free: bool) -> Hit | None:
        """The kept cache sharing the longest prefix with `prompt`, removed from the
        account, if any is worth taking. Taking a cache ends it for others: while a slot
        is free (`slot_free`), one is taken only for a hit on at least half of it (a
        conversation's next turn), so a prompt that shares a system prompt does not take
        a long conversation's cache. A sequence that drafts (`drafting`) takes only a
        cache whose MTP head's cache is there too."""
        best: Hit | None = None
        for seq_id, retained in self._kept.items():
            if drafting and not retained.drafted:
                continue
            # One position is recomputed: its hidden state rebuilds the MTP head's last
            # entry, whose next token may differ; and the last prompt token's logits are
            # needed.
            shared = common_prefix(retained.tokens, prompt) - 1
            if slot_free and 2 * shared < len(retained.tokens):
                continue
            if self.state_block:  # a recurrent state restarts where it was saved
                shared = max((p for p in retained.saved if p <= shared), default=0)
            if shared > (best.keep if best else 0):
                best = Hit(seq_id, retained, shared)
        if best is not None:
            del self._kept[best.seq_id]
            self.cached_prompt_tokens += best.keep
        return best

    def evict(self) -> str:
        """Drop the least recently kept cache; returns its sequence, to release."""
        seq_id, _ = self._kept.popitem(last=False)
        self.evictions += 1
        return seq_id

    def forget(self) -> list[str]:
        """Drop every kept cache (the workers' caches are gone, or are to be released)."""
        dropped = list(self._kept)
        self._kept.clear()
        return dropped


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix: a binary search over slice comparisons
    (done in C), as a Python loop over 2k-token prompts, for every kept cache, would hold
    the scheduler's lock for milliseconds."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low
