"""Single-process reference runs that pipeline outputs are compared against."""

from __future__ import annotations

import numpy as np
import torch

from mtpd.model.sampling import select_token
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine

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
            token = select_token(logits, params, len(history), torch.tensor(history), len(prompt))
            tokens.append(token)
            history.append(token)
            logits = engine.forward("reference", len(history) - 1, [token])
    finally:
        engine.release("reference")
    return tokens, logits_seen


class ScriptedDrafts:
    """Drafts taken from the reference continuation, with one chosen position corrupted
    per step (cycling through none, 0, 1, ..., k-1), so every acceptance length and the
    bonus token occur; records the acceptance each step must have."""

    def __init__(self, prompt: list[int], reference: list[int], k: int, vocab: int) -> None:
        self.prompt, self.reference, self.k, self.vocab = prompt, reference, k, vocab
        self.expected: list[tuple[int, int]] = []  # (drafts sent, drafts that must pass)

    def __call__(self, seq_id, history, proposed, k):
        g = len(history) - len(self.prompt)
        drafts = list(self.reference[g : g + k])
        corrupt = len(self.expected) % (self.k + 1) - 1  # -1: none
        if 0 <= corrupt < len(drafts):
            drafts[corrupt] = (drafts[corrupt] + 1) % self.vocab
            self.expected.append((len(drafts), corrupt))
        else:
            self.expected.append((len(drafts), len(drafts)))
        return drafts

    def check(self, steps: list) -> None:
        """Every decoding step (the scheduler's records after the prompt's) accepted
        exactly what it had to, and each acceptance length occurred."""
        decode_steps = steps[1:]
        assert len(decode_steps) == len(self.expected)
        for step, (sent, must_pass) in zip(decode_steps, self.expected, strict=True):
            (outcome,) = step.outcome.results.values()
            assert outcome.accepted == must_pass, (sent, must_pass)
            assert len(outcome.token_ids) == outcome.accepted + 1  # the correction or the bonus
        # Full acceptance with a bonus token, and every partial length, all happened.
        assert {(self.k, a) for a in range(self.k + 1)} <= set(self.expected)


def smollm2_references(
    questions: list[str], tokens: int
) -> tuple[int, list[tuple[list[int], list[int], list[torch.Tensor]]]]:
    """The default model's layer count, and per question: the chat prompt's ids and the
    single-process engine's greedy tokens and logits."""
    engine = Engine.load(None, max_context=256)
    tok = engine.tokenizer
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}])) for q in questions]
    return engine.cfg.num_layers, [(p, *solo_run(engine, p, tokens)) for p in prompts]


def openai_processed(
    logits: torch.Tensor, bias: dict[int, float], presence: float, frequency: float, generated
) -> np.ndarray:
    """OpenAI's logit bias and penalties, written out from their definitions: the bias
    first, then per token t, minus frequency * n_t + presence * (n_t > 0), n_t counting
    the generated tokens only."""
    out = logits.double().numpy().copy()
    for token, b in bias.items():
        out[token] += b
    counts = np.bincount(np.array(generated, dtype=np.int64), minlength=out.shape[-1])
    return out - frequency * counts - presence * (counts > 0)


def penalised_run(
    engine: Engine,
    prompt: list[int],
    n: int,
    bias: dict[int, float],
    presence: float,
    frequency: float,
) -> list[int]:
    """`n` greedy tokens under openai_processed (no end-of-sequence stop)."""
    history, tokens = list(prompt), []
    try:
        logits = engine.forward("penalised", 0, history)
        for _ in range(n):
            token = int(openai_processed(logits, bias, presence, frequency, tokens).argmax())
            tokens.append(token)
            history.append(token)
            logits = engine.forward("penalised", len(history) - 1, [token])
    finally:
        engine.release("penalised")
    return tokens
