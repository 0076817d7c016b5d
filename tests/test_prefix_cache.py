"""Prefix caching through the pipeline: a request whose prompt begins with a finished
request's prompt and reply takes over that request's cache (attention layers and the
MTP head's), and its output is exactly a fresh single-process run's (the oracle):
greedy and seeded, MTP on and off, 1 to 3 workers; an edited earlier turn hits up to
the first changed token; an evicted cache is not hit; a worker restart empties every
cache and the daemon prefills what is missing."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from concurrent.futures import Future

import pytest
from hypothesis import given
from hypothesis import strategies as st
from live_daemon import wait_for
from reference import GREEDY, solo_run
from tiny_models import write_drafting_model
from tiny_pipeline import start_pipeline

from mtpd.daemon.draft_policy import DraftPolicy
from mtpd.daemon.pipeline import Pipeline
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.compare import compare_tokens
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine

LAYERS, VOCAB, TOKENS = 4, 98, 24
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
TURN_1 = [5, 17, 33, 2, 9, 60, 41, 70, 3, 3, 12]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix") / "model"
    write_drafting_model(path, LAYERS, VOCAB)
    return path, Engine.load(path, max_context=256)


def start(path, workers: int, max_seqs: int = 4) -> Pipeline:
    return start_pipeline(path, LAYERS, workers, max_seqs=max_seqs, max_restarts=10)


def ask(scheduler, engine, prompt, params=GREEDY):
    """A request's handle and result, its tokens checked against a solo run."""
    request = scheduler.submit(prompt, params, TOKENS, ignore_eos=True)
    result = request.result(timeout=120)
    tokens, logits = solo_run(engine, prompt, TOKENS, params)
    assert result.finish_reason == "length", result.error
    if params.greedy:
        agreement = compare_tokens(tokens, logits, result.token_ids)
        assert agreement.ok, agreement
    else:
        assert result.token_ids == tokens
    return request, result


@pytest.mark.parametrize(
    ("workers", "draft", "params"),
    [(1, 3, GREEDY), (2, 0, SAMPLED), (3, 2, SAMPLED), (2, 3, GREEDY)],
    ids=["1w-k3-greedy", "2w-off-sampled", "3w-k2-sampled", "2w-k3-greedy"],
)
def test_a_conversation_reuses_its_cache_and_decodes_exactly(tiny, workers, draft, params):
    path, engine = tiny
    with start(path, workers) as pipeline:
        scheduler = Scheduler(pipeline, set(), policy=DraftPolicy(draft), prefix_cache=True)

        turn = functools.partial(ask, scheduler, engine, params=params)

        first, reply = turn(TURN_1)
        assert first.cached_tokens == 0
        # The next turn: the whole conversation again, and a new question.
        turn_2 = TURN_1 + reply.token_ids + [44, 45, 46, 47]
        second, _ = turn(turn_2)
        cached = len(TURN_1) + TOKENS - 1  # the last reply token was never fed
        assert second.cached_tokens == cached - 1  # one position is recomputed
        if draft:  # the MTP head's cache came with it: drafting goes on at once
            assert second.drafts.drafted and second.drafts.drafted[0] >= TOKENS // (draft + 1)
        # An edited question: the hit stops at the first changed token.
        asked = len(TURN_1) + TOKENS
        edited = [*turn_2[:asked], 90, *turn_2[asked + 1 :]]
        third, reply_3 = turn(edited)
        assert third.cached_tokens == asked - 1
        # A prompt sharing a few tokens only leaves that conversation's cache alone (slots
        # are free)...
        fourth, _ = turn([*TURN_1[:6], 91, 92])
        assert fourth.cached_tokens == 0
        # ...so its next turn still hits it whole.
        turn_3 = edited + reply_3.token_ids + [50, 51]
        fifth, _ = turn(turn_3)
        assert fifth.cached_tokens == len(edited) + TOKENS - 2
        assert scheduler.prefix.cached_prompt_tokens == sum(
            r.cached_tokens for r in (first, second, third, fourth, fifth)
        )
        scheduler.close()


def test_an_evicted_cache_is_not_hit_and_a_restart_empties_them(tiny):
    path, engine = tiny
    with start(path, 2, max_seqs=2) as pipeline:
        scheduler = Scheduler(pipeline, set(), policy=DraftPolicy(2), prefix_cache=True)

        turn = functools.partial(ask, scheduler, engine)

        _, reply = turn(TURN_1)
        # Two other conversations take both slots: the first's cache is evicted.
        turn([70, 71, 72, 73, 74])
        turn([80, 81, 82])
        later, _ = turn(TURN_1 + reply.token_ids + [44])
        assert later.cached_tokens == 0
        # Kept now; a restart of a worker empties every cache: nothing is hit after it.
        _, reply = turn([60, 61, 62, 63])
        os.kill(pipeline.stages[1].pid, signal.SIGKILL)
        asked = [60, 61, 62, 63, *reply.token_ids, 9]
        after, _ = turn(asked)
        assert after.cached_tokens == 0
        # Caching goes on after the restart: the next request shares that whole prompt.
        again, _ = turn([*asked, 10])
        assert again.cached_tokens == len(asked) - 1
        assert pipeline.restarts[1] >= 1
        scheduler.close()


def test_workers_hold_exactly_the_kept_caches_whatever_ends_a_request(tiny):
    """Requests cancelled before or during their first step, and one whose adopting step
    the workers refuse: afterwards the workers hold exactly the caches the daemon keeps
    (a cache a request was to take over is kept again, or released)."""
    path, _ = tiny
    with start(path, 1, max_seqs=3) as pipeline:
        submit = pipeline.submit

        def slow(*args, **kwargs):  # each step's result a while after it ran
            done, late = submit(*args, **kwargs), Future()
            done.add_done_callback(
                lambda f: (
                    threading.Timer(0.2, lambda: late.set_result(f.result())).start()
                    if f.exception() is None
                    else late.set_exception(f.exception())
                )
            )
            return late

        pipeline.submit = slow
        scheduler = Scheduler(pipeline, set(), policy=DraftPolicy(2), prefix_cache=True)
        first = scheduler.submit(TURN_1, GREEDY, TOKENS, ignore_eos=True)
        conversation = TURN_1 + first.result(timeout=60).token_ids
        for i in range(2):
            busy = scheduler.submit([70 + i, 71], GREEDY, 4, ignore_eos=True)
            time.sleep(0.1)  # its step holds the only stage
            later = scheduler.submit([*conversation, 44 + i], GREEDY, 8, ignore_eos=True)
            # Admitted, its cache chosen, its first step not sent yet:
            wait_for(lambda later=later: later.cached_tokens > 0, timeout=10)
            later.cancel()
            later.result(timeout=60)
            busy.result(timeout=60)
        refused = scheduler.submit([*conversation, VOCAB + 5], GREEDY, 8)
        assert refused.result(timeout=60).finish_reason == "error"

        def held():
            return {w.active_sequences for w in pipeline.worker_stats()}

        assert held() == {scheduler.retained_caches}
        assert scheduler.retained_caches <= 3
        scheduler.close()
        assert held() == {0}


@given(
    st.lists(st.integers(0, 2), max_size=12),
    st.lists(st.integers(0, 2), max_size=12),
    st.integers(0, 12),
)
def test_the_common_prefix_is_the_elementwise_one(a, b, shared):
    from mtpd.daemon.prefix_cache import common_prefix

    b = a[:shared] + b
    pairs = enumerate(zip(a, b, strict=False))
    naive = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
    assert common_prefix(a, b) == naive
