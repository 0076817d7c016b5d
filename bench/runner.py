"""Running one benchmark configuration (a draft setting at a concurrency) on a live
pipeline, and reading what its steps and workers say about where the time and the
memory went."""

from __future__ import annotations

import random
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mtpd.daemon.draft_policy import DraftPolicy, DraftStats
from mtpd.daemon.pipeline import Pipeline
from mtpd.daemon.request import Request, Result
from mtpd.daemon.scheduler import Scheduler, StepRecord
from mtpd.model.sampling_params import SamplingParams

# A step where every sequence sent at most this many tokens verified drafts (or decoded
# plainly); larger ones carry a prompt chunk.
MAX_DECODE_ROWS = 17


@dataclass
class ConfigRun:
    """What one configuration produced: every request's tokens and timing, the pipeline
    steps it ran, and its wall time."""

    draft: int | str
    concurrency: int
    results: list[Result]
    ttft_s: list[float]
    decode_rates: list[float]  # per request: tokens after the first / time after the first
    steps: list[StepRecord]
    wall_s: float
    drafts: DraftStats = field(default_factory=DraftStats)
    lookahead: bool = False  # the scheduler sent steps before the last answered

    @property
    def throughput(self) -> float:
        """Tokens per second over the whole run: what the server delivered."""
        return sum(len(r.token_ids) for r in self.results) / self.wall_s

    @property
    def decode_rate(self) -> float:
        """Mean decode tokens/s of one stream."""
        return statistics.mean(self.decode_rates)


class ForcedAcceptance:
    """Drafts taken from MTP off's greedy continuations, each one kept with probability
    `p` (else changed, so it is rejected): acceptance by position becomes `p` whatever
    the head proposes, while drafting (the head still runs) and verification cost what
    they cost. For models whose head cannot draft well yet, like random-weight ones:
    the output stays exactly plain decoding's."""

    def __init__(self, references: list[tuple[list[int], list[int]]], vocab: int, p: float):
        self.references, self.vocab, self.p = references, vocab, p
        self._random = random.Random(0)

    def __call__(self, seq_id: str, history: list[int], proposed: list[int], k: int) -> list[int]:
        prompt, continuation = next((p, c) for p, c in self.references if history[: len(p)] == p)
        done = len(history) - len(prompt)
        drafts = list(continuation[done : done + k])
        for j, token in enumerate(drafts):
            if self._random.random() >= self.p:
                drafts[j] = (token + 1) % self.vocab
                break
        return drafts


def run_config(
    pipeline: Pipeline,
    prompts: list[list[int]],
    draft: int | str,
    concurrency: int,
    max_tokens: int,
    p_min: float = 0.0,
    want_logits: bool = False,
    draft_source: ForcedAcceptance | None = None,
    policy: DraftPolicy | None = None,
    lookahead: bool | None = None,
) -> ConfigRun:
    """Every prompt once, greedy, `max_tokens` each (end-of-sequence ignored, so every
    configuration does the same work), with `concurrency` requests in flight (a closed
    loop: the next is submitted as one finishes). `policy` (for `draft`) carries what
    earlier runs measured, as a serving daemon's does; by default a fresh one.
    `lookahead`: the scheduler's (None: where it pays, as a daemon decides)."""
    if policy is not None and policy.setting != draft:
        raise ValueError(f"a policy for drafts {policy.setting} given for drafts {draft}")
    scheduler = Scheduler(
        pipeline,
        eos_ids=set(),
        policy=policy or DraftPolicy(draft, p_min),
        draft_source=draft_source,
        lookahead=lookahead,
    )

    def run_one(prompt: list[int]) -> Request:
        request = scheduler.submit(
            prompt, SamplingParams(), max_tokens, ignore_eos=True, return_logits=want_logits
        )
        request.result()
        return request

    # `concurrency` callers: a pool thread takes the next prompt as its request ends.
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        start = time.monotonic()
        futures = [pool.submit(run_one, prompt) for prompt in prompts]
        done = [f.result() for f in futures]
        wall = time.monotonic() - start
        steps = list(scheduler.recent_steps)
        lookahead = scheduler.lookahead
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, the prompts not yet taken
        scheduler.close()
    results = [r.result() for r in done]
    for r in results:
        if r.finish_reason != "length":
            raise RuntimeError(f"a benchmark request ended with {r.finish_reason}: {r.error}")
    drafts = DraftStats()
    for r in results:
        drafts.merge(r.drafts)
    return ConfigRun(
        draft=draft,
        concurrency=concurrency,
        results=results,
        ttft_s=[r.first_token_at - r.submitted_at for r in done],
        decode_rates=[
            (len(r.token_ids) - 1) / (r.finished_at - r.first_token_at)
            for r in done
            if r.finished_at > r.first_token_at
        ],
        steps=steps,
        wall_s=wall,
        drafts=drafts,
        lookahead=lookahead,
    )


def decode_steps(steps: list[StepRecord]) -> list[StepRecord]:
    return [s for s in steps if all(n <= MAX_DECODE_ROWS for _, n in s.tokens)]


def step_split(steps: list[StepRecord]) -> dict:
    """Median milliseconds of a decode step and its parts: each stage's verification
    (its layers over every position sent), the MTP head's drafting on the tail, each
    hop's transport (activations in hand at stage i+1 minus compute done at stage i; the
    workers' time.monotonic() clocks are the host's CLOCK_MONOTONIC), and control — the
    step's cost at the daemon (StepOutcome.cost: on one stage, since the step before it
    completed) less all of those: the step stream, scheduling, serialisation."""
    rows = []
    for s in decode_steps(steps):
        t, o = s.outcome.timings, s.outcome
        verify = [x.compute_s - x.draft_s for x in t]
        hops = [t[i + 1].input_ready_at - t[i].computed_at for i in range(len(t) - 1)]
        total = o.cost
        draft = t[-1].draft_s
        rows.append((total, verify, draft, hops, total - sum(verify) - draft - sum(hops)))
    if not rows:
        return {}

    def med(values: list[float]) -> float:
        return round(1000 * statistics.median(values), 3)

    stages = len(rows[0][1])
    total, control = med([r[0] for r in rows]), med([r[4] for r in rows])
    return {
        "decode_steps": len(rows),
        "step_ms": total,
        "verify_ms_per_stage": [med([r[1][i] for r in rows]) for i in range(stages)],
        "draft_ms": med([r[2] for r in rows]),
        "transport_ms_per_hop": [med([r[3][i] for r in rows]) for i in range(stages - 1)],
        "control_ms": control,
        "control_fraction": round(control / total, 4) if total else 0.0,
    }


def mean_verify_s(steps: list[StepRecord]) -> float:
    """Mean time of a decode step's verification, summed over the stages."""
    values = [sum(x.compute_s - x.draft_s for x in s.outcome.timings) for s in decode_steps(steps)]
    return statistics.mean(values) if values else 0.0


def mean_step_s(steps: list[StepRecord]) -> float:
    values = [s.outcome.cost for s in decode_steps(steps)]
    return statistics.mean(values) if values else 0.0


def process_peak_bytes() -> int:
    """This process's peak resident set so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory(pipeline: Pipeline, coordinator_peak: int | None = None) -> dict:
    """Per worker: weights, what MTP adds, KV cache and peak; and the coordinator's
    peak (this process's, unless given: peers loaded into it would count)."""
    workers = pipeline.worker_stats()
    weights = sum(w.weight_bytes for w in workers)
    mtp = sum(w.mtp_bytes for w in workers)
    return {
        "workers": [
            {
                "rank": rank,
                "device": stage.device,
                "pid": stage.pid,
                "weight_bytes": w.weight_bytes,
                "mtp_bytes": w.mtp_bytes,
                "kv_cache_bytes": w.kv_cache_bytes,
                "peak_bytes": w.peak_memory_bytes,
            }
            for rank, (stage, w) in enumerate(zip(pipeline.stages, workers, strict=True))
        ],
        "coordinator_peak_bytes": coordinator_peak or process_peak_bytes(),
        "weight_bytes": weights,
        "mtp_bytes": mtp,
        "mtp_over_weights": round(mtp / weights, 4) if weights else 0.0,
    }
