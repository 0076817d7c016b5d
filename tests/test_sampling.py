"""The sampler: filters match the reference's processors, draws depend only on (seed, position)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import openai_processed
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mtpd.model.sampling import (
    SamplingParams,
    select_token,
    select_tokens,
    target_probs,
    uniform,
)


def reference_probs(logits, history, p: SamplingParams) -> torch.Tensor:
    ids = history[None]
    x = logits[None].clone()
    for proc in (
        RepetitionPenaltyLogitsProcessor(p.repetition_penalty),
        TemperatureLogitsWarper(p.temperature),
        *([TopKLogitsWarper(p.top_k)] if p.top_k else []),
        *([TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []),
        *([MinPLogitsWarper(p.min_p)] if p.min_p else []),
    ):
        x = proc(ids, x)
    return torch.softmax(x[0].double(), -1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
    ],
)
def test_target_distribution_matches_reference_processors(params):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 3
    history = torch.randint(0, 50, (12,), generator=g)
    got = target_probs(logits, params, history)
    want = reference_probs(logits, history, params)
    assert torch.allclose(got, want, atol=1e-6)


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    assert select_token(logits, SamplingParams(), 0, torch.tensor([], dtype=torch.long)) == 1
    penalised = SamplingParams(repetition_penalty=1.5)
    assert select_token(logits, penalised, 0, torch.tensor([1])) == 2


def test_draws_depend_only_on_seed_and_position():
    logits = torch.randn(30, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=42)
    empty = torch.tensor([], dtype=torch.long)
    draws = [select_token(logits, p, pos, empty) for pos in range(200)]
    assert draws == [select_token(logits, p, pos, empty) for pos in range(200)]
    other_seed = SamplingParams(temperature=1.0, seed=43)
    assert draws != [select_token(logits, other_seed, pos, empty) for pos in range(200)]
    assert len({uniform(7, i) for i in range(1000)}) == 1000
    assert all(0 <= uniform(s, i) < 1 for s in (0, 1, 2**63) for i in range(100))


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    p = SamplingParams(temperature=1.0, seed=3)
    probs = torch.softmax(logits.double(), -1)
    n = 20000
    counts = torch.bincount(
        torch.tensor(
            [select_token(logits, p, i, torch.tensor([], dtype=torch.long)) for i in range(n)]
        ),
        minlength=5,
    ).double()
    chi2 = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, alpha = 0.001


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_a_batch_of_rows_draws_what_each_row_draws_alone():
    # Rows with different filters, seeds, penalties and greedy ones mixed in: batching
    # must not let one row's parameters leak into another's draw.
    g = torch.Generator().manual_seed(5)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.3, top_k=5, seed=2),
        SamplingParams(temperature=1.0, top_p=0.8, seed=3),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(temperature=0.9, min_p=0.1, seed=4),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
    ]
    for trial in range(30):
        logits = torch.randn(len(params), 40, generator=g) * 3
        histories = [torch.randint(0, 40, (trial % 7,), generator=g) for _ in params]
        positions = [trial * 3 + i for i in range(len(params))]
        alone = [
            select_token(logits[i], params[i], positions[i], histories[i])
            for i in range(len(params))
        ]
        assert select_tokens(logits, params, positions, histories) == alone
        assert select_tokens(logits[3:], params[3:], positions[3:], histories[3:]) == alone[3:]


def test_greedy_rows_take_the_first_largest_entry_as_torch_does():
    from mtpd.model.sampling import argmax_rows

    g = torch.Generator().manual_seed(5)
    rows = torch.randn(6, 49152, generator=g)
    rows[1, [7, 9000]] = 50.0  # a tie: the first
    rows[2, [3, 40000]] = float("nan")  # NaN counts as the largest
    rows[3] = -1.0  # all equal
    for view in (rows, rows[:, 100:], rows[::2], rows.bfloat16()):
        assert argmax_rows(view) == view.argmax(-1).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_bias_and_penalties_follow_openais_formulas(seed):
    from mtpd.model.sampling import processed_logits

    g = torch.Generator().manual_seed(seed)
    vocab, prompt_len = 50, 7
    logits = torch.randn(vocab, generator=g) * 3
    history = torch.randint(0, vocab, (prompt_len + 20,), generator=g)
    bias = {
        int(t): float(b)
        for t, b in zip(
            torch.randint(0, vocab, (6,), generator=g),
            torch.rand(6, generator=g) * 200 - 100,
            strict=True,
        )
    }
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, logit_bias=bias)
    got = processed_logits(logits[None], [params], [history], [prompt_len])[0]
    want = openai_processed(logits, bias, 0.7, -0.4, history[prompt_len:].tolist())
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-4)
    # Greedy picks the processed argmax; the prompt's tokens are not counted.
    assert select_token(logits, params, len(history), history, prompt_len) == int(want.argmax())
