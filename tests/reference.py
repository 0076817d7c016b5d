"""Single-process reference runs that pipeline outputs are compared against."""

from __future__ import annotations

import torch

from mtpd.model.sampling import SamplingParams, select_token
from mtpd.worker.engine import Engine

GREEDY = SamplingParams()


def solo_run(
    engine: Engine, prompt: list[int], n: int, params: SamplingParams = GREEDY
) -> tuple[list[int], list[torch.Tensor]]:
    """`n` tokens decoded one at a time (no end-of-sequence stop), with the logits each
    was chosen from."""
    history, tokens, logits_seen = list(prompt), [], []
    try:
        logits = engine.forward("reference", 0, history)
        for _ in range(n):
            logits_seen.append(logits)
            token = select_token(logits, params, len(history), torch.tensor(history))
            tokens.append(token)
            history.append(token)
            logits = engine.forward("reference", len(history) - 1, [token])
    finally:
        engine.release("reference")
    return tokens, logits_seen
