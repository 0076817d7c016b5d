"""The pipeline on tiny random checkpoints: separate worker processes, each holding
only its layers, give the single-process engine's output for any number of workers,
either activation transport, and any mix of sequences in a step."""

from __future__ import annotations

import itertools
import os
import time

import pytest
import torch
from reference import GREEDY, solo_run
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.compare import compare_tokens, logit_rows
from mtpd.train.engine import Engine

LAYERS = 4
PROMPTS = [[5, 17, 33, 2, 9, 60, 41], [70, 3, 3, 12], list(range(10, 60))]
CACHE_MEMORY = 64 << 20  # several pipelines may run at once: keep caches small


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    oracle = write_tiny_model(path, "qwen2", layers=LAYERS, vocab=98)
    write_char_tokenizer(path)
    engine = Engine.load(path, max_context=256)
    return path, oracle, engine


def start(path, workers: int, transport: str = "dist", **kw) -> Pipeline:
    cfg = PipelineConfig(
        model=str(path),
        num_layers=LAYERS,
        workers=workers,
        device="cpu",
        transport=transport,
        max_seqs=kw.pop("max_seqs", 4),
        max_context=256,
        cache_memory=CACHE_MEMORY,
        threads=1,
        **kw,
    )
    return Pipeline.start(cfg)


def expected_parameters(oracle, first: int, end: int, rank: int, world: int) -> int:
    """Counted on the transformers model (the oracle), not on what the worker loads."""
    params = dict(oracle.named_parameters())  # tied weights appear once
    count = sum(
        p.numel()
        for name, p in params.items()
        if name.startswith("model.layers.") and first <= int(name.split(".")[2]) < end
    )
    tail = rank == world - 1
    if rank == 0 or tail:
        count += params["model.embed_tokens.weight"].numel()
    if tail:
        count += params["model.norm.weight"].numel()
        if "lm_head.weight" in params:
            count += params["lm_head.weight"].numel()
    return count


@pytest.mark.parametrize("transport", ["dist", "grpc"])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_pipeline_output_equals_single_process(tiny, workers, transport):
    path, oracle, engine = tiny
    references = [solo_run(engine, prompt, 64) for prompt in PROMPTS]
    with start(path, workers, transport) as pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set())
        requests = [
            scheduler.submit(p, GREEDY, 64, ignore_eos=True, return_logits=True) for p in PROMPTS
        ]
        results = [r.result(timeout=300) for r in requests]

        # Separate processes, each holding exactly its contiguous range of layers.
        stages = pipeline.stages
        bounds = [0] + [s.end_layer for s in stages]
        assert [(s.first_layer, s.end_layer) for s in stages] == list(itertools.pairwise(bounds))
        assert bounds[-1] == LAYERS
        pids = {s.pid for s in stages}
        assert len(pids) == workers and os.getpid() not in pids
        for s in stages:
            assert s.load.parameter_count == expected_parameters(
                oracle, s.first_layer, s.end_layer, s.rank, workers
            )
            layers = {int(n.split(".")[2]) for n in s.load.tensor_names if ".layers." in n}
            assert layers == set(range(s.first_layer, s.end_layer))
        scheduler.close()

    for (ref_tokens, ref_logits), result in zip(references, results, strict=True):
        assert result.finish_reason == "length"
        agreement = compare_tokens(ref_tokens, ref_logits, result.token_ids)
        assert agreement.ok, str(agreement)
        upto = agreement.diverged_at if agreement.diverged_at is not None else 64
        for ref, got in zip(ref_logits[:upto], logit_rows(result.logits[:upto]), strict=True):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("workers", "transport"), [(2, "dist"), (3, "grpc")])
def test_concurrent_sequences_join_and_leave(tiny, workers, transport):
    """8 sequences of different prompt lengths and lengths of output, arriving while
    others run, through a cache of 4 slots and steps of at most 16 tokens (so long
    prompts are prefilled in chunks beside others' decoding): each equals its solo run."""
    path, _, engine = tiny
    prompts = [[(7 * i + j) % 90 + 4 for j in range(3 + 23 * i)] for i in range(8)]
    lengths = [40, 9, 25, 64, 12, 33, 50, 18]
    references = [solo_run(engine, p, n) for p, n in zip(prompts, lengths, strict=True)]
    with start(path, workers, transport, max_seqs=4) as pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set(), max_batch_tokens=16)
        first = [
            scheduler.submit(p, GREEDY, n, ignore_eos=True, return_logits=True)
            for p, n in zip(prompts[:4], lengths[:4], strict=True)
        ]
        # The rest arrive mid-run, once the first sequence is decoding.
        next(iter(first[0]))
        rest = [
            scheduler.submit(p, GREEDY, n, ignore_eos=True, return_logits=True)
            for p, n in zip(prompts[4:], lengths[4:], strict=True)
        ]
        results = [r.result(timeout=300) for r in first + rest]
        steps = list(scheduler.recent_steps)
        # Every finished sequence's cache slot is freed on every worker.
        wait_until(lambda: all(st.active_sequences == 0 for st in pipeline.worker_stats()))
        scheduler.close()

    for (ref_tokens, ref_logits), result in zip(references, results, strict=True):
        agreement = compare_tokens(ref_tokens, ref_logits, result.token_ids)
        assert agreement.ok, str(agreement)
    assert all(sum(n for _, n in s.tokens) <= 16 for s in steps)
    assert max(len(s.tokens) for s in steps) > 1, "sequences never shared a step"
    mixed = [
        s for s in steps if any(n > 1 for _, n in s.tokens) and any(n == 1 for _, n in s.tokens)
    ]
    assert mixed, "no prefill chunk ran beside another sequence's decoding"


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.parametrize(("workers", "transport"), [(2, "dist"), (2, "grpc")])
def test_a_bad_sequence_is_refused_alone_and_the_stages_stay_in_lockstep(tiny, workers, transport):
    """Sequences the daemon should never send (an id outside the vocabulary, a keep
    beyond the cache, a top_p of 0) are refused one by one, before any compute, on every
    stage alike: the step's good sequence runs, and the steps after it too."""
    from mtpd.rpc import sampling_to_wire
    from mtpd.v1 import worker_pb2 as pb

    path, _, engine = tiny
    prompt = PROMPTS[0]
    want = solo_run(engine, prompt, 2)[0]
    greedy = sampling_to_wire(GREEDY)
    bad_sampling = pb.SamplingParams(top_p=0.0, repetition_penalty=1.0)

    def step(seq_id, keep, ids) -> pb.SequenceStep:
        return pb.SequenceStep(seq_id=seq_id, keep=keep, token_ids=ids, sample=True)

    def opened(seq_id, sampling=greedy) -> pb.SequenceOpen:
        return pb.SequenceOpen(seq_id=seq_id, sampling=sampling)

    with start(path, workers, transport) as pipeline:
        first = pipeline.submit(
            [
                step("bad-id", 0, [5, 98]),
                step("good", 0, prompt),
                step("bad-keep", 3, [5]),
                step("bad-sampling", 0, [5]),
                step("unopened", 0, [5]),
            ],
            opened=[
                opened("bad-id"),
                opened("good"),
                opened("bad-keep"),
                opened("bad-sampling", bad_sampling),
            ],
        ).result(timeout=60)
        errors = {seq: r.error for seq, r in first.results.items() if r.error}
        assert set(errors) == {"bad-id", "bad-keep", "bad-sampling", "unopened"}
        assert "token id 98 is outside the vocabulary" in errors["bad-id"]
        assert "keep 3 beyond its 0 cached positions" in errors["bad-keep"]
        assert "top_p" in errors["bad-sampling"]
        assert "not opened" in errors["unopened"]
        assert list(first.results["good"].token_ids) == want[:1]
        assert [w.active_sequences for w in pipeline.worker_stats()] == [1] * workers
        # The good sequence's settings are held: its next step carries none.
        second = pipeline.submit(
            [step("good", len(prompt), want[:1]), step("bad-id", 0, [5])],
            opened=[opened("bad-id")],
        )
        results = second.result(timeout=60).results
        assert list(results["good"].token_ids) == want[1:2] and not results["bad-id"].error


def test_a_sequence_sends_its_settings_once_and_a_decode_step_only_what_changes(tiny):
    """Sampling parameters, return_logits, draft_p_min and the MTP switch travel in the
    sequence's first step (StepRequest.open) and are held by the workers; each decode
    step after it carries only ids, keep, tokens and counts."""
    from mtpd.daemon.draft_policy import DraftPolicy
    from mtpd.model.sampling_params import SamplingParams

    path, _, _ = tiny
    sent = []
    with start(path, 2) as pipeline:
        for link in pipeline.links:
            send = link.send
            link.send = lambda req, send=send: (sent.append(req), send(req))[1]
        scheduler = Scheduler(pipeline, eos_ids=set(), policy=DraftPolicy(0))
        params = SamplingParams(temperature=0.7, top_p=0.9, seed=3)
        request = scheduler.submit(PROMPTS[0], params, 6, ignore_eos=True, return_logits=True)
        result = request.result(timeout=60)
        scheduler.close()
    assert len(result.token_ids) == 6 and len(result.logits) == 6  # the held settings apply
    steps = [r for r in sent if r.sequences][::2]  # each step went to both workers
    first, decode = steps[0], steps[1:]
    (opened,) = first.open
    assert opened.seq_id == request.seq_id and opened.return_logits and opened.no_mtp
    assert opened.sampling.top_p == pytest.approx(0.9) and opened.sampling.seed == 3
    assert len(decode) == 5
    for step in decode:
        assert not step.open
        (seq,) = step.sequences
        assert {f.name for f, _ in seq.ListFields()} <= {"seq_id", "keep", "token_ids", "sample"}
        assert step.ByteSize() < 32  # step id, sequence id, keep, one token, sample
