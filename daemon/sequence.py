"""One sequence in the scheduler's hands: its request, token history, cache account and
prefill chunking."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mtpd.daemon.prefix_cache import Hit
from mtpd.daemon.request import Request
from mtpd.daemon.structured_output import Constraint
from mtpd.v1 import worker_pb2 as pb


@dataclass
class Sequence:
    """A request as the scheduler runs it: its token history and how much of it every
    worker has cached, and what its next step needs."""

    request: Request
    params: pb.SamplingParams
    history: list[int]  # prompt + accepted tokens
    prompt_len: int
    max_tokens: int
    ignore_eos: bool
    return_logits: bool
    draft_tokens: int | None  # the request's own drafts per step; None: the policy's
    top_logprobs: int | None  # None: no log-probabilities
    constraint: Constraint | None  # structured output: the grammar's matcher
    cached: int = 0  # positions every worker holds in its KV cache
    # Prefix caching: the kept cache its first step takes over, until a step's result
    # says the workers did.
    adopting: Hit | None = None
    # Hybrid models: positions after which every worker saved its recurrent state.
    saved: list[int] = field(default_factory=list)
    # A step of it was sent (the first, at keep 0, with its settings): the workers may
    # hold a slot for it, even with nothing cached (a step that failed whole took one).
    opened: bool = False
    in_flight: int = 0  # its steps in the pipeline: one, or two with a lookahead
    # Positions its steps in flight append (their drafts not counted).
    ahead: int = 0
    # Its last step in flight emits exactly one token, at `cached + ahead`, and asks the
    # head for no drafts: a lookahead step may follow it (Scheduler._can_follow).
    followable: bool = False
    proposed: list[int] = field(default_factory=list)  # the head's drafts for the next step
    verifying: int = 0  # drafts in the step in flight
    # A suspect: its step was in the pipeline when a worker failed. It runs alone until
    # its history is this long (its replay, then a step with drafts past the one that
    # failed); failing again alone, it is why.
    suspect_until: int | None = None

    @property
    def fingerprint(self) -> bytes:
        """Of its prompt and sampling: a quarantined one is refused when sent again."""
        return fingerprint(self.history[: self.prompt_len], self.params)

    @property
    def generated(self) -> int:
        return len(self.history) - self.prompt_len

    @property
    def pending(self) -> int:
        return len(self.history) - self.cached

    def chunk(self, budget: int, block: int) -> int:
        """How many of its pending tokens its next step takes, within `budget`. With a
        hybrid model's `block` (0: none), a prompt goes in whole blocks, then the rest
        (within one block) alone: the recurrent state after a whole block is then exact
        to save, and no output depends on how a prompt was split."""
        n = min(self.pending, budget)
        end = self.cached + n
        if not block or (end == len(self.history) and end - end % block <= self.cached):
            return n
        return max(0, end - end % block - self.cached)

    def saves_state(self, n: int, block: int) -> bool:
        """Whether a step of `n` tokens is a prompt chunk of whole blocks, after which
        the workers can save a hybrid model's recurrent state."""
        return bool(block) and n >= block and not (self.cached % block or n % block)


def fingerprint(prompt_ids: list[int], params: pb.SamplingParams) -> bytes:
    return hashlib.sha256(
        str(prompt_ids).encode() + params.SerializeToString(deterministic=True)
    ).digest()
