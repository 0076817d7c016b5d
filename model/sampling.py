"""Token selection: greedy, or sampling with temperature, top-k, top-p, min-p and a
repetition penalty.

Seeded sampling is reproducible in a strong sense: the draw at a position uses a
uniform that depends only on (seed, position), and inverts the CDF in token-id order.
So the same request gives the same tokens whatever the batch, the step shape, or how
many tokens one step emits (which is what lets verification of drafts be exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtpd.model.errors import InvalidParameter

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> InvalidParameter:
            return InvalidParameter(f"{field} {why}, got {getattr(self, field)!r}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "must be a finite number >= 0")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 turns it off)")
        if not (0 < self.top_p <= 1):
            raise bad("top_p", "must be in (0, 1]")
        if not (0 <= self.min_p < 1):
            raise bad("min_p", "must be in [0, 1)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "must be a finite number > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) from (seed, position) alone: a splitmix64 hash."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 11) * 2.0**-53


def apply_repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: float
) -> torch.Tensor:
    """The reference's (CTRL) penalty: seen tokens' logits divided by it if positive,
    multiplied if negative."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits[history]
    logits[history] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def target_probs(
    logits: torch.Tensor, params: SamplingParams, history: torch.Tensor
) -> torch.Tensor:
    """The distribution a token is drawn from at temperature > 0, as float64 [V].

    Filters run in the reference's order: penalty, temperature, top-k, top-p, min-p.
    """
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    logits = logits.double() / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        before = torch.cumsum(sorted_probs, 0) - sorted_probs
        drop = order[before >= params.top_p]
        probs[drop] = 0.0
    if params.min_p > 0:
        probs[probs < params.min_p * probs.max()] = 0.0
    return probs / probs.sum()


def select_token(
    logits: torch.Tensor, params: SamplingParams, position: int, history: torch.Tensor
) -> int:
    """The token at `position` given its logits [V] and the ids already in the sequence."""
    if params.greedy:
        return int(
            torch.argmax(apply_repetition_penalty(logits, history, params.repetition_penalty))
        )
    probs = target_probs(logits, params, history)
    cdf = torch.cumsum(probs, 0)
    u = uniform(params.seed, position) * float(cdf[-1])
    index = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True)[0])
    return min(index, probs.numel() - 1)
