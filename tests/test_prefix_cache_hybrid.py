"""Prefix caching on hybrid (Qwen3.5, dense and MoE) models: a Gated DeltaNet state
cannot be cut at any position, so the workers save it after prompt chunks of whole
64-position blocks and a later prompt restarts from the last one it shares. Oracles: the
same pipeline with the cache off (tokens and logits bit for bit: a prompt's chunks keep
to the blocks whatever the cache did), and a fresh single-process run under the shared
comparator."""

from __future__ import annotations

import os
import random
import signal

import grpc
import pytest
import torch
from live_daemon import LiveDaemon, wait_for
from reference import GREEDY, solo_run
from tiny_models import add_mtp_head, write_char_tokenizer, write_tiny_model
from tiny_pipeline import start_pipeline

from mtpd.client import Client
from mtpd.daemon.draft_policy import DraftPolicy
from mtpd.daemon.pipeline import Pipeline
from mtpd.daemon.scheduler import Scheduler
from mtpd.daemon.worker_link import LocalWorker, WorkerLink
from mtpd.model.compare import compare_tokens
from mtpd.model.config import LinearAttentionConfig
from mtpd.model.linear_state import LinearStates
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine
from mtpd.v1 import worker_pb2 as pb
from mtpd.worker.server import MAX_STATE_SNAPSHOTS

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS, VOCAB, TOKENS, BLOCK = 5, 98, 24, 64
KINDS = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
TURN_1 = random.Random(7).choices(range(3, VOCAB), k=150)
KILL: list[int] = []  # in a conversation's turns: a worker is killed here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (model path, reference engine): a hybrid model, dense or MoE, each with
    its own random MTP layer, made once."""
    made = {}

    def model(family: str = "qwen3_5"):
        if family not in made:
            path = tmp_path_factory.mktemp(family) / "model"
            write_tiny_model(
                path, family, layers=LAYERS, vocab=VOCAB, layer_types=[*KINDS, "full_attention"]
            )
            write_char_tokenizer(path)
            add_mtp_head(path)
            made[family] = path, Engine.load(path, max_context=512)
        return made[family]

    return model


def start(path, workers: int, max_seqs: int = 4) -> Pipeline:
    return start_pipeline(
        path,
        LAYERS,
        workers,
        max_seqs=max_seqs,
        max_context=512,
        max_restarts=10,
        state_snapshots=4,
    )


def run(scheduler, prompt, params):
    request = scheduler.submit(prompt, params, TOKENS, ignore_eos=True, return_logits=True)
    result = request.result(timeout=300)
    assert result.finish_reason == "length", result.error
    return request, result


def conversation(pipeline, engine, draft, params, turns, max_batch_tokens=256):
    """The prompts `turns` builds from the replies so far, each answered with the cache
    off (checked against a solo run), then all again with the cache on: the answers bit
    for bit the same. Returns the cached run's requests."""
    fresh = Scheduler(pipeline, set(), max_batch_tokens, policy=DraftPolicy(draft))
    prompts, answers = [], []

    def ask(prompt):
        if prompt is KILL:
            prompts.append(KILL)
            answers.append(None)
            return []
        _, result = run(fresh, prompt, params)
        tokens, logits = solo_run(engine, prompt, TOKENS, params)
        agreement = compare_tokens(tokens, logits, result.token_ids)
        assert agreement.ok, agreement
        prompts.append(prompt)
        answers.append(result)
        return result.token_ids

    turns(ask)
    fresh.close()  # its sequences released: the cached run's ids start over
    cached = Scheduler(
        pipeline, set(), max_batch_tokens, policy=DraftPolicy(draft), prefix_cache=True
    )
    requests = []
    for prompt, want in zip(prompts, answers, strict=True):
        if prompt is KILL:
            os.kill(pipeline.stages[1].pid, signal.SIGKILL)
            continue
        request, result = run(cached, prompt, params)
        assert result.token_ids == want.token_ids
        assert result.logits == want.logits  # bit for bit
        requests.append(request)
    cached.close()
    return requests


@pytest.mark.parametrize(
    ("family", "workers", "draft", "params"),
    [
        ("qwen3_5", 1, 3, GREEDY),
        ("qwen3_5_moe", 2, 0, SAMPLED),
        ("qwen3_5", 3, 2, SAMPLED),
        ("qwen3_5_moe", 2, 2, GREEDY),
    ],
    ids=["1w-k3-greedy", "moe-2w-off-sampled", "3w-k2-sampled", "moe-2w-k2-greedy"],
)
def test_a_conversation_restarts_from_saved_states_and_decodes_exactly(
    tiny, family, workers, draft, params
):
    path, engine = tiny(family)

    def turns(ask):
        reply = ask(TURN_1)
        # The next turn shares the first's 150 prompt and 23 reply positions.
        turn_2 = TURN_1 + reply + list(range(10, 30))
        ask(turn_2)
        # Edited at 193 (after the state saved at 192), then at 170 (before it).
        edited = [*turn_2[:193], 90, *turn_2[194:]]
        ask(edited)
        ask([*edited[:170], 91, *edited[171:]])

    with start(path, workers) as pipeline:
        assert pipeline.state_block == BLOCK
        first, second, third, fourth = conversation(pipeline, engine, draft, params, turns)
    assert first.cached_tokens == 0
    # The second restarts from the state saved after the prompt's whole blocks (the hit
    # ends mid-block), with the MTP head's cache: drafting goes on at once.
    assert second.cached_tokens == 2 * BLOCK
    if draft:
        assert second.drafts.drafted and second.drafts.drafted[0] > 0
    # Each edited one from the last saved state before its first changed token.
    assert third.cached_tokens == 3 * BLOCK
    assert fourth.cached_tokens == 2 * BLOCK


def test_a_hybrid_cache_evicted_or_lost_in_a_restart_is_prefilled_exactly(tiny):
    path, engine = tiny()

    def turns(ask):
        reply = ask(TURN_1)
        # Two other conversations take both slots: the first's cache is evicted.
        ask(TURN_1[50:120])
        ask(TURN_1[::-1])
        asked = TURN_1 + reply + [44]
        reply = ask(asked)
        # Kept now, and lost when a worker restarts.
        ask(KILL)
        asked = [*asked, *reply, 45]
        reply = ask(asked)
        ask([*asked, *reply, 9])  # caching goes on after the restart

    with start(path, 2, max_seqs=2) as pipeline:
        requests = conversation(pipeline, engine, 2, GREEDY, turns)
        assert pipeline.restarts[1] >= 1
    assert [r.cached_tokens for r in requests] == [0, 0, 0, 0, 0, 3 * BLOCK]


def test_a_sequence_keeps_its_latest_saved_states(tiny):
    """Chunks of one block save 6 states for a 400-token prompt; daemon and workers keep
    the latest 4 (at 192..384) alike. One slot, so every hit counts, however short."""
    path, engine = tiny()
    prompt = random.Random(8).choices(range(3, VOCAB), k=400)

    def turns(ask):
        ask(prompt)
        at_150 = [*prompt[:150], 90, *prompt[151:]]  # the states at 64 and 128 are gone
        ask(at_150)
        ask([*at_150[:350], 91, *at_150[351:]])  # the state at 320

    with start(path, 1, max_seqs=1) as pipeline:
        requests = conversation(pipeline, engine, 0, GREEDY, turns, max_batch_tokens=BLOCK)
    assert [r.cached_tokens for r in requests] == [0, 0, 5 * BLOCK]


def test_a_hybrid_prompt_does_not_wait_behind_decoding(tiny):
    """With a budget of one block, what a decoding sequence leaves is under a block: the
    prompt's chunk still goes in the next step, not after the decoding ends."""
    path, _ = tiny()
    with start(path, 1) as pipeline:
        scheduler = Scheduler(pipeline, set(), BLOCK, policy=DraftPolicy(0))
        decoding = scheduler.submit(TURN_1[:10], GREEDY, 400, ignore_eos=True)
        wait_for(lambda: len(decoding.token_ids) >= 5)
        prompt = scheduler.submit(TURN_1[:100], GREEDY, 4, ignore_eos=True)
        prompt.result(timeout=120)
        assert not decoding.done
        decoding.cancel()
        scheduler.close()


def test_a_worker_refuses_more_saved_states_than_it_keeps(tiny, tmp_path):
    """The daemon counts saved states as it asked for them: a worker that would keep fewer
    refuses the load, naming the field, rather than cut the number quietly."""
    path, _ = tiny()
    process = LocalWorker(0, tmp_path, "cpu", 1)
    try:
        link = WorkerLink(process.address)
        link.info(timeout=60)
        request = pb.LoadRequest(
            model=str(path), end_layer=LAYERS, dtype="float32", max_seqs=1, max_context=64,
            world_size=1, state_snapshots=MAX_STATE_SNAPSHOTS + 1,
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as refused:
            link.load(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"state_snapshots {MAX_STATE_SNAPSHOTS + 1} above" in refused.value.details()
        link.close()
    finally:
        process.stop()


@pytest.mark.parametrize("snapshots", [0, 4])
def test_saved_states_are_counted_in_a_slot_s_memory(snapshots):
    """What a worker sizes its slots by (`bytes_per_slot`) is what the states hold."""
    dims = LinearAttentionConfig(
        num_key_heads=2, num_value_heads=4, key_head_dim=16, value_head_dim=8, conv_kernel=4
    )
    states = LinearStates(3, 5, dims, torch.bfloat16, torch.device("cpu"), snapshots)
    assert states.nbytes == 5 * LinearStates.bytes_per_slot(3, dims, torch.bfloat16, snapshots)


def test_mtpd_serve_reuses_a_hybrid_conversation_s_cache(tiny, tmp_path):
    """Through the daemon as users run it (prefix caching on by default): the next turn
    reports the reused positions, and its tokens are plain decoding's."""
    path, engine = tiny()
    with (
        LiveDaemon(path, tmp_path, "--draft-tokens", "2") as daemon,
        Client(daemon.address, timeout=120) as client,
    ):

        def ask(prompt):
            result = client.generate(prompt, max_tokens=TOKENS, ignore_eos=True, temperature=0)
            tokens, logits = solo_run(engine, prompt, TOKENS, GREEDY)
            assert compare_tokens(tokens, logits, result.token_ids).ok
            return result

        first = ask(TURN_1)
        second = ask(TURN_1 + first.token_ids + [44, 45])
        assert (first.cached_tokens, second.cached_tokens) == (0, 2 * BLOCK)
        assert client.stats().cached_prompt_tokens == 2 * BLOCK
