"""Verification on the tail: which drafts the model accepts, and the token after them.

"Sample and match" (DESIGN.md): at every position the tail draws the model's own token
exactly as plain decoding would (same sampler, same uniform for (seed, position)) and
accepts drafts while they equal the drawn tokens. Greedy is the temperature-0 case. So
the emitted tokens are the ones plain decoding would emit, whatever was drafted.
"""

from __future__ import annotations

import torch

from mtpd.model.sampling import argmax_rows, select_token
from mtpd.model.sampling_params import SamplingParams


def verify(
    logits: torch.Tensor,
    params: SamplingParams,
    history: list[int],
    base: int,
    drafts: int,
    prompt_len: int,
) -> list[int]:
    """Accept a prefix of the drafts and emit one more token.

    logits: [drafts + 1, V]; row j predicts position base + j + 1.
    history: the sequence's tokens through the drafts (positions 0 .. base + drafts), of
    which the first `prompt_len` are the prompt's (penalties count the others).
    Returns the accepted drafts followed by the drawn token after them.
    """
    if params.greedy and not params.processed:
        # Each row's token depends on its logits alone: one argmax over every row (a
        # row at a time had cost a 2-row verification about 0.15 ms of Python).
        drawn = argmax_rows(logits[: drafts + 1])
    else:
        ids = torch.tensor(history)  # once: row j sees the prefix before its position
        drawn = (
            select_token(logits[j], params, base + j + 1, ids[: base + j + 1], prompt_len)
            for j in range(drafts + 1)
        )
    emitted = []
    for j, token in enumerate(drawn):
        emitted.append(token)
        if j == drafts or token != history[base + j + 1]:
            break
    return emitted
