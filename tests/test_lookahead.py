"""Lookahead on a one-stage pipeline: the daemon sends a sequence's next plain decoding
step while the one before it runs, and the worker appends the token it sampled itself
(SequenceStep.follow). Output stays that of one-token-at-a-time decoding; a sequence
that ends while its lookahead runs keeps its cache for prefix caching; a worker killed
with both steps in flight replays them without blaming the request."""

from __future__ import annotations

import os
import signal
import time
from itertools import pairwise

import pytest
import torch
from reference import GREEDY, solo_run
from tiny_models import write_drafting_model
from tiny_pipeline import start_pipeline

from mtpd.daemon.draft_policy import AUTO, DraftPolicy
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.compare import compare_tokens
from mtpd.model.decoder import DecoderShard, ShardSpec
from mtpd.model.sampling_params import SamplingParams
from mtpd.rpc import sampling_to_wire
from mtpd.train.engine import Engine
from mtpd.v1 import worker_pb2 as pb
from mtpd.worker.stage import Stage

LAYERS, VOCAB, TOKENS = 4, 98, 32
PROMPTS = [[5, 17, 33, 2, 9, 60, 41], [70, 3, 3, 12], list(range(10, 50))]
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
CASES = [(p, GREEDY) for p in PROMPTS] + [(PROMPTS[0], SEEDED)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("lookahead") / "model"
    write_drafting_model(path, LAYERS, VOCAB)
    return path, Engine.load(path, max_context=256)


def overlapped(steps) -> int:
    """Steps sent before the one ahead of them had answered: the lookaheads."""
    return sum(b.outcome.submitted_at < a.outcome.completed_at for a, b in pairwise(steps))


@pytest.mark.parametrize("setting", [0, AUTO])
def test_lookahead_output_equals_one_token_decoding(tiny, setting):
    """Greedy and seeded sampling, four streams at once: the tokens of plain decoding,
    with lookahead on (where steps overlap) as off (where none does)."""
    path, engine = tiny
    references = [solo_run(engine, p, TOKENS, params) for p, params in CASES]
    with start_pipeline(path, LAYERS, 1, max_seqs=8) as pipeline:
        for lookahead in (True, False):
            scheduler = Scheduler(
                pipeline, eos_ids=set(), policy=DraftPolicy(setting), lookahead=lookahead
            )
            requests = [scheduler.submit(p, s, TOKENS, ignore_eos=True) for p, s in CASES]
            results = [r.result(timeout=300) for r in requests]
            steps = list(scheduler.recent_steps)
            scheduler.close()
            for (tokens, logits), result in zip(references, results, strict=True):
                assert compare_tokens(tokens, logits, result.token_ids).ok
            assert result.token_ids == references[-1][0]  # seeded: exactly
            if lookahead:
                assert overlapped(steps) > TOKENS // 2
            else:
                assert overlapped(steps) == 0


def test_an_end_of_sequence_under_a_lookahead_keeps_the_cache_for_the_next_turn(tiny):
    """The step after an end-of-sequence token was already running: the reply stops at
    the token, and the cache kept (the lookahead's position dropped) serves a prompt
    that continues the conversation, whose output is plain decoding's."""
    path, engine = tiny
    prompt = PROMPTS[2]
    tokens, _ = solo_run(engine, prompt, TOKENS)
    # The end: the first token after the third that the reply has not had yet.
    stop_at = next(j for j in range(3, TOKENS) if tokens[j] not in tokens[:j])
    eos = tokens[stop_at]
    with start_pipeline(path, LAYERS, 1) as pipeline:
        scheduler = Scheduler(pipeline, eos_ids={eos}, prefix_cache=True, lookahead=True)
        first = scheduler.submit(prompt, GREEDY, TOKENS).result(timeout=300)
        assert first.finish_reason == "stop"
        assert first.token_ids == tokens[:stop_at]
        assert overlapped(list(scheduler.recent_steps)) > 0
        assert scheduler.retained_caches == 1
        follow_up = prompt + tokens[: stop_at + 1] + [7, 8]
        expected, logits = solo_run(engine, follow_up, 16)
        second = scheduler.submit(follow_up, GREEDY, 16, ignore_eos=True)
        result = second.result(timeout=300)
        scheduler.close()
    # Every position the first reply cached but its last, which is recomputed (the
    # lookahead's, past it, is not among them).
    assert second.cached_tokens == len(prompt) + stop_at - 1
    assert compare_tokens(expected, logits, result.token_ids).ok


def test_a_lone_stream_killed_with_its_lookahead_in_flight_is_replayed_not_quarantined(tiny):
    path, engine = tiny
    prompt = PROMPTS[1]
    tokens, logits = solo_run(engine, prompt, 48)
    with start_pipeline(path, LAYERS, 1, max_restarts=10) as pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set(), lookahead=True)
        for after in (3, 20, 40):
            request = scheduler.submit(prompt, GREEDY, 48, ignore_eos=True)
            while len(request.token_ids) < after:
                time.sleep(0.002)
            os.kill(pipeline.stages[0].pid, signal.SIGKILL)
            result = request.result(timeout=300)
            assert result.finish_reason == "length", result.error
            assert compare_tokens(tokens, logits, result.token_ids).ok
        scheduler.close()
        assert pipeline.restarts == [3]


def stage(path, world_size: int = 1) -> Stage:
    ckpt = open_checkpoint(path)
    cfg = read_config(ckpt)
    shard = DecoderShard.load(ckpt, cfg, ShardSpec.whole(cfg), torch.float32, 128)
    return Stage(shard, shard.new_cache(2), 0, world_size, None)


def run(stage: Stage, *steps: pb.SequenceStep) -> list[pb.SequenceResult]:
    opened = [
        pb.SequenceOpen(seq_id=s.seq_id, sampling=sampling_to_wire(GREEDY))
        for s in steps
        if s.keep == 0
    ]
    return list(stage.run(pb.StepRequest(step_id=1, sequences=steps, open=opened)).results)


def test_a_follow_step_appends_the_token_its_worker_emitted(tiny):
    path, _ = tiny
    explicit, followed = stage(path), stage(path)
    prompt = PROMPTS[0]
    (a,) = run(explicit, pb.SequenceStep(seq_id="s", token_ids=prompt, sample=True))
    (b,) = run(followed, pb.SequenceStep(seq_id="s", token_ids=prompt, sample=True))
    assert a.token_ids and b.token_ids == a.token_ids
    keep = len(prompt)
    for _ in range(5):
        step = pb.SequenceStep(seq_id="s", keep=keep, token_ids=a.token_ids, sample=True)
        (a,) = run(explicit, step)
        (b,) = run(followed, pb.SequenceStep(seq_id="s", keep=keep, sample=True, follow=True))
        assert b.token_ids == a.token_ids and not b.error
        keep += 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"keep": 6}, "where its previous step emitted no token"),
        ({"keep": 8}, "where its previous step emitted no token"),
        ({"token_ids": [3]}, "carries no token ids"),
        ({"sample": False}, "and samples"),
        ({"seq_id": "fresh"}, "where its previous step emitted no token"),
    ],
)
def test_a_follow_step_that_does_not_follow_is_refused_alone(tiny, change, message):
    path, _ = tiny
    worker = stage(path)
    prompt = PROMPTS[0]
    (first,) = run(worker, pb.SequenceStep(seq_id="s", token_ids=prompt, sample=True))
    assert first.token_ids and not first.error
    bad = {"seq_id": "s", "keep": len(prompt), "sample": True, "follow": True, **change}
    other = pb.SequenceStep(seq_id="t", token_ids=prompt, sample=True)
    refused, ran = run(worker, pb.SequenceStep(**bad), other)
    assert message in refused.error
    assert ran.token_ids and not ran.error  # the step's other sequence ran
    (again,) = run(worker, pb.SequenceStep(seq_id="s", keep=len(prompt), sample=True, follow=True))
    assert again.token_ids and not again.error  # and the refused one's state is intact


def test_follow_needs_a_one_stage_pipeline(tiny):
    path, _ = tiny
    first = stage(path, world_size=2)
    step = pb.SequenceStep(seq_id="s", keep=0, sample=True, follow=True)
    (refused,) = run(first, step)
    assert "one-stage pipeline" in refused.error


def test_lookahead_is_on_where_the_daemon_has_a_core_of_its_own(tiny):
    """By default only where the worker's threads leave a core free (or compute on a
    GPU): on a CPU whose every core the worker uses, the daemon would only move its
    turnaround into the step. Never across stages."""
    path, _ = tiny
    cores = os.cpu_count()
    for threads in {cores, 1}:
        with start_pipeline(path, LAYERS, 1, threads=threads) as pipeline:
            scheduler = Scheduler(pipeline, eos_ids=set())
            scheduler.submit(PROMPTS[0], GREEDY, 16, ignore_eos=True).result(timeout=300)
            steps = list(scheduler.recent_steps)
            scheduler.close()
        assert scheduler.lookahead == (threads < cores)
        assert (overlapped(steps) > 0) == (threads < cores)
    with start_pipeline(path, LAYERS, 2) as pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set(), lookahead=True)
        scheduler.close()
        assert not scheduler.lookahead
