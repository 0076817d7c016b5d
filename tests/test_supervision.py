"""Supervision: a worker killed (SIGKILL) or wedged (SIGSTOP) mid-generation is
replaced, the pipeline re-forms without reloading the survivors, and every running
stream is replayed from its token history: each completes with exactly the output of
a fault-free run. A worker that crashes on every start spends its restart budget:
requests fail with UNAVAILABLE naming it, and the daemon stays up."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from types import SimpleNamespace

import pytest
from live_daemon import LiveDaemon, held, write_served_model
from reference import GREEDY, solo_run

from mtpd.daemon.draft_policy import DraftPolicy
from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.compare import compare_tokens
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine

TOKENS = 48
PROMPTS = ["The first stream", "Another one", "A third prompt here", "Last"]
PARAMS = [GREEDY, GREEDY, GREEDY, SamplingParams(temperature=0.8, seed=7)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_served_model(tmp_path_factory.mktemp("supervised") / "model")


@pytest.fixture(scope="module")
def references(model):
    engine = Engine.load(model, max_context=256)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    return prompts, [
        solo_run(engine, p, TOKENS, params) for p, params in zip(prompts, PARAMS, strict=True)
    ]


def start(model, workers: int, **kw) -> Pipeline:
    return Pipeline.start(
        PipelineConfig(
            model=str(model),
            num_layers=4,
            workers=workers,
            device="cpu",
            max_seqs=4,
            max_context=256,
            cache_memory=32 << 20,
            threads=1,
            load_mtp=True,
            max_restarts=100,
            **kw,
        )
    )


def run_streams(scheduler: Scheduler, prompts, fault=None) -> list:
    requests = [
        scheduler.submit(p, params, TOKENS, ignore_eos=True)
        for p, params in zip(prompts, PARAMS, strict=True)
    ]
    if fault is not None:
        fault(requests)
    return [r.result(timeout=300) for r in requests]


def check(results, references) -> None:
    for result, (tokens, logits), params in zip(results, references, PARAMS, strict=True):
        assert result.finish_reason == "length", result.error
        if params.greedy:
            agreement = compare_tokens(tokens, logits, result.token_ids)
            assert agreement.ok, agreement
        else:
            assert result.token_ids == tokens


@pytest.mark.parametrize("workers", [2, 3])
def test_sigkill_at_random_points_ten_times_replays_every_stream(model, references, workers):
    prompts, refs = references
    rng = random.Random(workers)
    with start(model, workers) as pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set(), policy=DraftPolicy(2))
        for trial in range(10):
            victim = rng.randrange(workers)
            after = rng.randrange(1, TOKENS - 8)  # tokens of the first stream before the kill

            def kill(requests, victim=victim, after=after):
                while len(requests[0].token_ids) < after:
                    time.sleep(0.002)
                os.kill(pipeline.stages[victim].pid, signal.SIGKILL)

            results = run_streams(scheduler, prompts, kill)
            check(results, refs)
            assert sum(pipeline.restarts) == trial + 1
        scheduler.close()


def test_a_wedged_worker_is_found_by_the_step_timeout_and_replaced(model, references):
    prompts, refs = references
    with start(model, 2, step_timeout_s=3.0) as pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set(), policy=DraftPolicy(2))
        stopped = pipeline.stages[1].pid

        def stop(requests):
            while len(requests[0].token_ids) < 10:
                time.sleep(0.002)
            os.kill(stopped, signal.SIGSTOP)

        check(run_streams(scheduler, prompts, stop), refs)
        assert pipeline.restarts == [0, 1] and pipeline.stages[1].pid != stopped
        scheduler.close()


def test_through_the_daemon_a_restart_costs_latency_and_a_crash_loop_fails_cleanly(model, tmp_path):
    """SDK streams running while a worker is killed complete unchanged; later, a
    worker that crashes on every start spends its restart budget: UNAVAILABLE naming
    it, and the daemon stays up."""
    # Every Python process started from now on reads this directory's sitecustomize:
    # restarted workers run it, the ones already running never will.
    site = tmp_path / "site"
    site.mkdir()
    from mtpd.client import Client, Unavailable

    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with (
        LiveDaemon(model, tmp_path / "daemon", "--max-restarts", "2", env=env) as daemon,
        Client(daemon.address, timeout=120) as client,
    ):
        want = [client.generate(p, max_tokens=TOKENS, ignore_eos=True) for p in PROMPTS]
        streams = [client.stream(p, max_tokens=TOKENS, ignore_eos=True) for p in PROMPTS]
        iters = [iter(s) for s in streams]
        for it in iters:
            next(it)
        os.kill(client.info().workers[0].pid, signal.SIGKILL)
        for it in iters:
            for _ in it:
                pass
        assert [s.result.token_ids for s in streams] == [w.token_ids for w in want]
        deadline = time.monotonic() + 30  # the finished streams' caches are freed
        while any(held(client.stats())):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (site / "sitecustomize.py").write_text(
            "import sys\nif 'worker' in sys.argv:\n    raise SystemExit('cannot start')\n"
        )
        os.kill(client.info().workers[1].pid, signal.SIGKILL)
        with pytest.raises(Unavailable, match=r"worker 1 failed again after 2 restarts"):
            client.generate("lost", max_tokens=3, ignore_eos=True)
        assert daemon.process.poll() is None  # the daemon itself stays up
        assert client.info().num_layers == 4
        assert daemon.stop() == 0


def test_the_worker_replaced_is_the_one_that_failed_not_a_bystander_that_reported():
    # A killed stage 0 often shows first as stage 1's failed receive; restarting stage 1
    # could never succeed while stage 0 is gone. A stage that raised is blamed over one
    # that only lost its neighbour.
    class Process:
        def __init__(self, exited: bool) -> None:
            self.exited = exited

        def describe_exit(self) -> str | None:
            return "exited with code -9" if self.exited else None

    pipeline = SimpleNamespace(
        processes=[Process(True), Process(False), Process(False)],
        _lock=threading.Lock(),
        _blamed=[2],
    )
    assert Pipeline._failed_worker(pipeline, 1) == 0  # exited
    pipeline.processes[0].exited = False
    assert Pipeline._failed_worker(pipeline, 1) == 2  # failed itself
    assert pipeline._blamed == []  # taken: later reports are about the next failure
    assert Pipeline._failed_worker(pipeline, 1, wait_s=0.05) == 1  # the reporter
