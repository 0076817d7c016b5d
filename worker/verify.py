"""Verification on the tail: which drafts the model accepts, and the token after them.

"Sample and match" (DESIGN.md): at every position the tail draws the model's own token
exactly as plain decoding would (same sampler, same uniform for (seed, position)) and
accepts drafts while they equal the drawn tokens. Greedy is the temperature-0 case. So
the emitted tokens are the ones plain decoding would emit, whatever was drafted.
"""

from __future__ import annotations

import torch

from mtpd.model.sampling import select_token
from mtpd.model.sampling_params import SamplingParams


def verify(
    logits: torch.Tensor, params: SamplingParams, history: list[int], base: int, drafts: int
) -> list[int]:
    """Accept a prefix of the drafts and emit one more token.

    logits: [drafts + 1, V]; row j predicts position base + j + 1.
    history: the sequence's tokens through the drafts (positions 0 .. base + drafts).
    Returns the accepted drafts followed by the drawn token after them.
    """
    emitted = []
    ids = torch.tensor(history)  # once: row j sees the prefix before its position
    for j in range(drafts + 1):
        position = base + j + 1
        token = select_token(logits[j], params, position, ids[:position])
        emitted.append(token)
        if j == drafts or token != history[position]:
            break
    return emitted
