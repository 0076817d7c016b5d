"""MTP speculative decoding through the pipeline: drafting at the tail, verification of
k+1 positions in one pass, and output exactly that of plain decoding."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from reference import GREEDY, ScriptedDrafts, solo_run
from tiny_models import random_head, write_char_tokenizer, write_drafting_model, write_tiny_model
from tiny_pipeline import start_pipeline

from mtpd.daemon.draft_policy import AUTO, DraftPolicy
from mtpd.daemon.pipeline import Pipeline
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.compare import compare_tokens
from mtpd.model.decoder import DecoderShard, ShardSpec
from mtpd.model.mtp import MTPHead
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine
from mtpd.v1 import worker_pb2 as pb
from mtpd.worker.stage import Stage

LAYERS, VOCAB, TOKENS = 4, 98, 40
PROMPTS = [[5, 17, 33, 2, 9, 60, 41], [70, 3, 3, 12], list(range(10, 50))]
SAMPLED = [
    SamplingParams(temperature=1.0, seed=11),
    SamplingParams(top_p=0.9, temperature=1.0, seed=5),
]
CASES = [(p, GREEDY) for p in PROMPTS] + [(PROMPTS[0], s) for s in SAMPLED]
SETTINGS = [1, 2, 3, 4, 5, 6, AUTO]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "model"
    write_drafting_model(path, LAYERS, VOCAB)
    engine = Engine.load(path, max_context=256)
    return path, engine


def start(path, workers: int, load_mtp: bool = True) -> Pipeline:
    return start_pipeline(path, LAYERS, workers, max_seqs=8, load_mtp=load_mtp)


class PriorCosts(DraftPolicy):
    """`auto` with its cost model held at the prior, where drafts pay: the tiny model's
    head costs as much as its trunk, so measured costs turn drafting, and exploring, off
    (right for speed, but these tests check that auto's changing draft lengths, decided
    by the acceptance measured, keep the output exact)."""

    def observe_step(self, *args, **kwargs) -> None:
        pass


def generate(pipeline, cases, setting, draft_source=None, tokens=TOKENS):
    policy = PriorCosts(setting) if setting == AUTO else DraftPolicy(setting)
    scheduler = Scheduler(pipeline, eos_ids=set(), policy=policy, draft_source=draft_source)
    requests = [scheduler.submit(p, params, tokens, ignore_eos=True) for p, params in cases]
    results = [r.result(timeout=300) for r in requests]
    steps = list(scheduler.recent_steps)
    scheduler.close()
    return results, steps


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_mtp_output_equals_plain_decoding(tiny, workers):
    """Greedy and seeded sampling (temperature 1, top-p 0.9), in mixed batches, for every
    draft length and the adaptive policy: the tokens of plain one-token decoding."""
    path, engine = tiny
    references = [solo_run(engine, p, TOKENS, params) for p, params in CASES]
    with start(path, workers) as pipeline:
        assert "own MTP layer" in pipeline.mtp_head
        for setting in SETTINGS:
            results, steps = generate(pipeline, CASES, setting)
            for (ref_tokens, ref_logits), result in zip(references, results, strict=True):
                agreement = compare_tokens(ref_tokens, ref_logits, result.token_ids)
                assert agreement.ok, f"k={setting}: {agreement}"
            # Drafts were really verified in these steps.
            assert sum(len(r.drafts.drafted) for r in results) > 0
            assert max(n for s in steps for _, n in s.tokens if n < 10) > 1


@pytest.mark.parametrize("params", [GREEDY, SAMPLED[0]], ids=["greedy", "sampled"])
def test_scripted_drafts_exercise_every_acceptance_length(tiny, params):
    path, engine = tiny
    prompt, k = PROMPTS[0], 4
    ref_tokens, ref_logits = solo_run(engine, prompt, TOKENS, params)
    source = ScriptedDrafts(prompt, ref_tokens, k, VOCAB)
    with start(path, 2, load_mtp=False) as pipeline:
        (result,), steps = generate(pipeline, [(prompt, params)], k, draft_source=source)
    assert compare_tokens(ref_tokens, ref_logits, result.token_ids).equal
    source.check(steps)
    assert result.drafts.tokens_per_step > 1


def test_mtp_cache_is_rebuilt_from_verified_states(tiny):
    """After a rejection, the next drafts (and the head's cache) equal those of a fresh
    run over the same accepted tokens."""
    path, _ = tiny
    ckpt = open_checkpoint(path)
    cfg = read_config(ckpt)

    def stage() -> Stage:
        shard = DecoderShard.load(ckpt, cfg, ShardSpec.whole(cfg), torch.float32, 128)
        head = MTPHead(cfg, random_head(cfg), shard.embedding, shard.lm_head, 128, torch.float32)
        return Stage(shard, shard.new_cache(1), 0, 1, None, head)

    def step(stage, keep, tokens, verify=0):
        sampling = pb.SamplingParams(temperature=0, top_p=1, repetition_penalty=1)
        seq = pb.SequenceStep(
            seq_id="s", keep=keep, token_ids=tokens, sample=True, draft_tokens=3, verify=verify
        )
        opened = [pb.SequenceOpen(seq_id="s", sampling=sampling)] if keep == 0 else []
        (result,) = stage.run(pb.StepRequest(step_id=1, sequences=[seq], open=opened)).results
        return result

    prompt = PROMPTS[2]
    a = stage()
    first = step(a, 0, prompt)
    t = first.token_ids[0]
    # Verify three drafts of which the second is wrong: exactly one is accepted.
    good = solo_greedy(a, [*prompt, t], 3)
    drafts = [good[0], (good[1] + 1) % VOCAB, good[2]]
    result = step(a, len(prompt), [t, *drafts], verify=3)
    assert result.accepted == 1
    accepted = [t, drafts[0], result.token_ids[-1]]

    b = stage()
    fresh = step(b, 0, prompt + accepted[:-1])
    assert fresh.token_ids[-1] == accepted[-1]
    assert list(result.draft_token_ids) == list(fresh.draft_token_ids)
    n = len(prompt) + 2  # verified head entries: one per position with a known next token
    ca, cb = a.drafter.cache, b.drafter.cache
    sa, sb = ca.slot_of("s"), cb.slot_of("s")
    assert ca.lengths[sa] == cb.lengths[sb] == n
    torch.testing.assert_close(ca.k[:, sa, :, :n], cb.k[:, sb, :, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(ca.v[:, sa, :, :n], cb.v[:, sb, :, :n], atol=1e-5, rtol=0)


def solo_greedy(stage: Stage, prefix: list[int], n: int) -> list[int]:
    """The trunk's own greedy continuation of `prefix` (a scratch copy of the stage's
    shard, so the stage's caches are untouched)."""
    cache = stage.shard.new_cache(1)
    slot = cache.slot("x")
    out, ids = [], list(prefix)
    with torch.inference_mode():
        for _ in range(n):
            start = cache.lengths[slot]
            h = stage.shard(torch.tensor(ids[start:]), cache, [slot], [len(ids) - start])
            ids.append(int(stage.shard.logits(h[-1]).argmax()))
            out.append(ids[-1])
    return out


def test_run_without_a_head_says_so_once_and_decodes_plainly(tmp_path):
    path = tmp_path / "plain"
    write_tiny_model(path, "llama", layers=2, vocab=VOCAB)
    write_char_tokenizer(path)
    cmd = [sys.executable, "-m", "mtpd", "run", "hello", "--raw", "--model", str(path)]
    out = subprocess.run(
        [*cmd, "--json", "--max-tokens", "8", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stderr.count("has no MTP head") == 1
    result = json.loads(out.stdout)
    assert result["draft_tokens"] == 0 and result["acceptance_by_position"] == []


def test_draft_p_min_stops_unlikely_drafts(tiny):
    """A random head is never 99% sure of a token: with --draft-p-min 0.99 nothing is
    drafted, and the output is unchanged."""
    path, engine = tiny
    prompt = PROMPTS[1]
    ref_tokens, _ = solo_run(engine, prompt, 24)
    with start(path, 1) as pipeline:
        for p_min, drafts_expected in ((0.99, False), (0.0, True)):
            scheduler = Scheduler(pipeline, eos_ids=set(), policy=DraftPolicy(3, p_min))
            result = scheduler.submit(prompt, GREEDY, 24, ignore_eos=True).result(timeout=120)
            scheduler.close()
            assert result.token_ids == ref_tokens
            assert (sum(result.drafts.drafted) > 0) == drafts_expected
