"""Token selection: greedy, or sampling with temperature, top-k, top-p, min-p; after a
logit bias, a repetition penalty and presence and frequency penalties.

Seeded sampling is reproducible in a strong sense: the draw at a position uses a
uniform that depends only on (seed, position), and inverts the CDF in token-id order.
So the same request gives the same tokens whatever the batch, the step shape, or how
many tokens one step emits (which is what lets verification of drafts be exact).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from mtpd.model.errors import InputError
from mtpd.model.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


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
    logits: torch.Tensor, params: SamplingParams, history: torch.Tensor, prompt_len: int = 0
) -> torch.Tensor:
    """The distribution a token is drawn from at temperature > 0, as float64 [V]."""
    return target_probs_rows(logits[None], [params], [history], [prompt_len])[0]


def target_probs_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[torch.Tensor],
    prompt_lens: Sequence[int] | None = None,
) -> torch.Tensor:
    """target_probs for many rows at once, each with its own parameters: [B, V] float64.

    Filters run in the reference's order: bias and penalties, temperature, top-k,
    top-p, min-p. Batched because a CPU loop over rows, one sort of the vocabulary
    each, is what bounds sampling many sequences together on a GPU.
    """
    logits = processed_logits(logits.float(), params, histories, prompt_lens).double()
    column = functools.partial(torch.tensor, dtype=torch.float64, device=logits.device)
    logits = logits / column([[p.temperature] for p in params])
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab for p in params):
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        top = torch.topk(logits, max(ks), dim=-1).values
        kth = top.gather(-1, torch.tensor([[max(k, 1) - 1] for k in ks], device=logits.device))
        off = torch.tensor([[k == 0] for k in ks], device=logits.device)
        kth = kth.masked_fill(off, -math.inf)
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        before = torch.cumsum(sorted_probs, -1) - sorted_probs
        top_p = column([[p.top_p] for p in params])
        drop_sorted = (before >= top_p) & (top_p < 1.0)
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0)
    if any(p.min_p > 0 for p in params):
        min_p = column([[p.min_p] for p in params])
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def processed_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[torch.Tensor],
    prompt_lens: Sequence[int] | None = None,
) -> torch.Tensor:
    """Each row's logits after its bias and penalties, in vLLM's order: the bias, the
    repetition penalty (over the whole sequence, as the reference's), then presence and
    frequency (over the tokens generated: those of `histories[i]` after the prompt's
    `prompt_lens[i]`)."""
    rows = [i for i, p in enumerate(params) if p.processed]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        p, history = params[i], histories[i].to(logits.device)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
            logits[i, ids] += bias.to(logits.device)
        if p.repetition_penalty != 1.0 and history.numel():
            logits[i] = apply_repetition_penalty(logits[i], history, p.repetition_penalty)
        generated = history[prompt_lens[i] if prompt_lens else 0 :]
        if (p.presence_penalty or p.frequency_penalty) and generated.numel():
            # The distinct tokens only: a count over the whole vocabulary per row took
            # 0.7-1.4 ms at 152k tokens, on the tail's serial path.
            seen, counts = torch.unique(generated, return_counts=True)
            counts = counts.to(logits.dtype)
            logits[i, seen] -= p.frequency_penalty * counts + p.presence_penalty
    return logits


def token_mask(mask: bytes, rows: int, vocab: int) -> torch.Tensor:
    """The allowed tokens, bool [rows, vocab], of a step's packed token_mask (worker.proto:
    rows of ceil(vocab / 32) little-endian uint32 words, bit t % 32 of word t // 32 for
    token t); an InputError when it does not fit or a row allows nothing."""
    words = (vocab + 31) // 32
    if len(mask) != rows * words * 4:
        raise InputError(
            f"token_mask of {len(mask)} bytes: {rows} row(s) of {words * 4} bytes expected"
        )
    packed = np.frombuffer(mask, dtype=np.uint8).reshape(rows, words * 4)
    allowed = np.unpackbits(packed, axis=-1, bitorder="little")[:, :vocab].astype(bool)
    if not allowed.any(-1).all():
        raise InputError("token_mask allows no token at some position")
    return torch.from_numpy(allowed)


def masked(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits [rows, V] with the tokens a grammar forbids at -inf: they are never drawn."""
    return logits.masked_fill(~allowed.to(logits.device), -math.inf)


def argmax_rows(rows: torch.Tensor) -> list[int]:
    """The first largest entry's index in each row of [B, V]. On the CPU through numpy:
    PyTorch's CPU argmax took 80 us over a 49k vocabulary, numpy's 6 (both take the
    first of equal maxima, and a NaN as the largest)."""
    if rows.device.type == "cpu":  # as float32: numpy has no bfloat16
        return rows.detach().float().numpy().argmax(-1).tolist()
    return rows.argmax(-1).tolist()


def select_token(
    logits: torch.Tensor,
    params: SamplingParams,
    position: int,
    history: torch.Tensor,
    prompt_len: int = 0,
) -> int:
    """The token at `position` given its logits [V] and the ids already in the sequence
    (of which the first `prompt_len` are the prompt's)."""
    return select_tokens(logits[None], [params], [position], [history], [prompt_len])[0]


def select_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    positions: Sequence[int],
    histories: Sequence[torch.Tensor],
    prompt_lens: Sequence[int] | None = None,
) -> list[int]:
    """select_token for rows of logits [B, V] at once (on their device)."""
    tokens = [0] * len(params)

    def some(rows: list[int]) -> tuple:
        return (
            [params[i] for i in rows],
            [histories[i] for i in rows],
            None if prompt_lens is None else [prompt_lens[i] for i in rows],
        )

    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        rows = logits[greedy] if len(greedy) < len(params) else logits
        for i, token in zip(
            greedy, argmax_rows(processed_logits(rows, *some(greedy))), strict=True
        ):
            tokens[i] = token
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        probs = target_probs_rows(logits[sampled], *some(sampled))
        cdf = torch.cumsum(probs, -1)
        u = torch.tensor(
            [[uniform(params[i].seed, positions[i])] for i in sampled],
            dtype=cdf.dtype,
            device=cdf.device,
        )
        index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
        for i, token in zip(sampled, index[:, 0].tolist(), strict=True):
            tokens[i] = token
    return tokens
