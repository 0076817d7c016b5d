"""The one comparator for "identical output" (model/compare.py): what counts as a
near-tie depends on the dtype the model computed in."""

from __future__ import annotations

import torch

from mtpd.model.compare import compare_tokens


def logits_with_gap(gap: float, top: float = 25.0) -> torch.Tensor:
    logits = torch.zeros(10)
    logits[3], logits[7] = top, top - gap
    return logits


def test_equal_sequences_agree_and_a_difference_is_located():
    logits = [logits_with_gap(5.0)] * 4
    assert compare_tokens([3, 3, 3], logits, [3, 3, 3]).equal
    agreement = compare_tokens([3, 3, 3], logits, [3, 7, 3])
    assert not agreement.ok and agreement.diverged_at == 1 and agreement.gap == 5.0
    # A candidate that stops early differs where it stopped.
    assert compare_tokens([3, 3, 3], logits, [3, 3]).diverged_at == 2


def test_float32_near_ties_are_within_1e_4():
    assert compare_tokens([3], [logits_with_gap(5e-5)], [7]).ok
    assert not compare_tokens([3], [logits_with_gap(1e-2)], [7]).ok


def test_16_bit_near_ties_scale_with_the_top_logit():
    # bf16 moved SmolLM2's logits by up to 0.69 between step shapes: a gap of 0.5 under a
    # top logit of 25 may flip there, not in float32; a gap of 3 may not flip in either.
    assert compare_tokens([3], [logits_with_gap(0.5)], [7], torch.bfloat16).ok
    assert not compare_tokens([3], [logits_with_gap(0.5)], [7]).ok
    assert not compare_tokens([3], [logits_with_gap(3.0)], [7], torch.bfloat16).ok
    # The band follows the logits' scale, and float16's finer rounding narrows it.
    assert not compare_tokens([3], [logits_with_gap(0.5, top=5.0)], [7], torch.bfloat16).ok
    assert not compare_tokens([3], [logits_with_gap(0.5)], [7], torch.float16).ok
