"""Where a concurrent run's wall time goes, per draft setting, in one daemon: decode steps
(by rows, and whether the MTP head ran and caught its cache up), steps that carry a
prompt, and the daemon's gaps between steps. Written to see why `auto` trails MTP off at
8 int4 streams (docs/speculative-decoding.md).

    python benchmarks/batch_time_split.py [--quant int4] [--concurrency 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from mtpd.bench.commands import DEFAULT_PROMPTS
from mtpd.bench.runner import decode_steps, run_config
from mtpd.daemon.coordinator import Coordinator, Settings
from mtpd.daemon.draft_policy import AUTO
from mtpd.daemon.pipeline import PipelineConfig


def step_s(step) -> float:
    return step.outcome.duration


def report(draft, run) -> None:
    decoding = decode_steps(run.steps)
    ids = {id(s) for s in decoding}
    prompts = [s for s in run.steps if id(s) not in ids]
    busy = sum(map(step_s, run.steps))
    tokens = sum(len(r.token_ids) for r in run.results)
    print(
        f"drafts {draft!s:>4}: {tokens / run.wall_s:6.1f} tok/s in all, "
        f"{statistics.mean(run.decode_rates):6.1f} per stream; "
        f"decode steps {len(decoding)} ({sum(map(step_s, decoding)):.3f} s), "
        f"prompt steps {len(prompts)} ({sum(map(step_s, prompts)):.3f} s), "
        f"gaps {run.wall_s - busy:.3f} s"
    )
    groups = defaultdict(list)
    for s in decoding:
        tail = s.outcome.timings[-1]
        key = (sum(n for _, n in s.tokens), tail.draft_passes > 0, tail.draft_catch_up_s > 0)
        groups[key].append((step_s(s), tail.draft_s, tail.draft_catch_up_s))
    for (rows, drafted, caught_up), values in sorted(groups.items()):
        step, draft_s, catch_up = (1000 * statistics.mean(v[i] for v in values) for i in range(3))
        print(
            f"    {rows:2d} rows, head {'ran' if drafted else 'idle'}"
            f"{' with catch-up' if caught_up else ''}: {len(values):3d} steps of {step:.2f} ms "
            f"(head {draft_s:.2f} ms, catch-up {catch_up:.2f} ms)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", default="int4")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    settings = Settings(
        pipeline=PipelineConfig(workers=1, quant=args.quant, device="cpu"), draft_tokens=AUTO
    )
    with Coordinator.start(settings) as daemon:
        tok = daemon.tokenizer
        texts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(args.requests)]
        prompts = [tok.encode_chat([{"role": "user", "content": t}])[1] for t in texts]
        run_config(daemon.pipeline, prompts[:1], AUTO, 1, 8)  # warm-up
        for _ in range(args.rounds):
            for draft in (0, AUTO):
                run = run_config(daemon.pipeline, prompts, draft, args.concurrency, args.max_tokens)
                report(draft, run)


if __name__ == "__main__":
    main()
