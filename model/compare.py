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
# A 16-bit model rounds its residual stream at every layer, so the same positions run at
# another step shape move logits by several units in the last place of the top logit:
# SmolLM2 in bfloat16 on CPU, decoded one row at a time against verification steps of 3
# rows, moved by up to 0.69 (median 0.34; at worst 4.6% of the top logit, 5.9 machine
# epsilons). For those dtypes a near-tie is a gap within 10 epsilons of the top logit.
NEAR_TIE_EPSILONS = 10


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


def near_tie_tolerance(logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """The top-2 gap under which a model computed in `dtype` may pick either token."""
    relative = NEAR_TIE_EPSILONS * torch.finfo(dtype).eps * abs(float(logits.max()))
    return max(NEAR_TIE_FLOAT32, relative)


def logit_rows(rows: Sequence[bytes | torch.Tensor]) -> list[torch.Tensor]:
    """Logits as tensors, from a scheduler Result's float32 bytes (or tensors already)."""
    return [
        torch.frombuffer(bytearray(r), dtype=torch.float32) if isinstance(r, bytes) else r
        for r in rows
    ]


def compare_tokens(
    reference: Sequence[int],
    reference_logits: Sequence[torch.Tensor | bytes],
    candidate: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> Agreement:
    """`reference_logits[i]` are the logits the reference chose `reference[i]` from
    (one more entry past the end when the reference stopped on its own); `dtype` is the
    one the model computed in."""
    if list(reference) == list(candidate):
        return Agreement(True)
    at = next(
        (i for i, (a, b) in enumerate(zip(reference, candidate, strict=False)) if a != b),
        min(len(reference), len(candidate)),
    )
    if at >= len(reference_logits):
        return Agreement(False, at, float("inf"))
    (logits,) = logit_rows([reference_logits[at]])
    return Agreement(False, at, top2_gap(logits), near_tie_tolerance(logits, dtype))
