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


def smollm2_references(
    questions: list[str], tokens: int
) -> tuple[int, list[tuple[list[int], list[int], list[torch.Tensor]]]]:
    """The default model's layer count, and per question: the chat prompt's ids and the
    single-process engine's greedy tokens and logits."""
    engine = Engine.load(None, max_context=256)
    tok = engine.tokenizer
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}])) for q in questions]
    return engine.cfg.num_layers, [(p, *solo_run(engine, p, tokens)) for p in prompts]
