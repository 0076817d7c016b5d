"""The one comparator for "identical output" (DESIGN.md, Invariants).

Two token sequences agree if they are equal, or if at the first position where they
differ the reference's top-2 logits were within the tolerance: a near-tie, where a
different but equally valid rounding of the same computation may pick either token.
Every test and benchmark that compares outputs uses this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEAR_TIE_FLOAT32 = 1e-4


@dataclass(frozen=True)
class Agreement:
    equal: bool
    diverged_at: int | None = None  # first differing position
    gap: float | None = None  # the reference's top-2 logit gap there
    tolerance: float = NEAR_TIE_FLOAT32

    @property
    def ok(self) -> bool:
        return self.equal or (self.gap is not None and self.gap <= self.tolerance)

    def __str__(self) -> str:
        if self.equal:
            return "identical"
        kind = "near-tie" if self.ok else "DIVERGED"
        return f"{kind} at token {self.diverged_at} (reference top-2 gap {self.gap:.3g})"


def top2_gap(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def compare_tokens(
    reference: Sequence[int],
    reference_logits: Sequence[torch.Tensor],
    candidate: Sequence[int],
    tolerance: float = NEAR_TIE_FLOAT32,
) -> Agreement:
    """`reference_logits[i]` are the logits the reference chose `reference[i]` from
    (one more entry past the end when the reference stopped on its own)."""
    if list(reference) == list(candidate):
        return Agreement(True, tolerance=tolerance)
    at = next(
        (i for i, (a, b) in enumerate(zip(reference, candidate, strict=False)) if a != b),
        min(len(reference), len(candidate)),
    )
    gap = top2_gap(reference_logits[at]) if at < len(reference_logits) else float("inf")
    return Agreement(False, at, gap, tolerance)
