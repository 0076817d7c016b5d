"""How a prompt is cut into steps (`Sequence.chunk`), against the rule it must keep: any
split for attention-only models; for a hybrid one, chunks of whole blocks, then the
rest within one block alone, whatever budgets the steps leave it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mtpd.daemon.request import Request
from mtpd.daemon.sequence import Sequence


def sequence(length: int, cached: int) -> Sequence:
    return Sequence(
        Request("s", 1), None, [1] * length, length, 1, True, False, None, None, None, cached
    )


@given(
    st.integers(1, 700),
    st.integers(0, 10).map(lambda blocks: 64 * blocks),
    st.lists(st.integers(1, 300), min_size=1, max_size=40),
    st.sampled_from([0, 64]),
)
def test_a_prompt_is_cut_into_whole_blocks_then_the_rest(length, start, budgets, block):
    if start >= length:
        start = 0
    seq = sequence(length, start)
    ends, steps = [], 0
    while seq.pending:
        budget = budgets[steps % len(budgets)]
        n = seq.chunk(budget, block)
        assert 0 <= n <= budget
        if budget >= block:
            assert n > 0  # a budget of a block always makes progress
        else:  # what the scheduler gives a step's first prompt chunk that got nothing
            n = n or seq.chunk(block, block)
        seq.cached += n
        ends.append(seq.cached)
        steps += 1
    if block:
        *whole, last = ends
        assert all(end % block == 0 for end in whole)
        begins = [start, *whole]
        # The rest (within one block) goes alone: a chunk ending off a block begins on one
        # and stays within it.
        if last % block:
            assert begins[-1] % block == 0 and last - begins[-1] < block
