"""The scheduler's lookahead on against off, side by side on one int4 worker: every
configuration (drafts × streams) runs with both in each round, the order alternating by
round, on one daemon and one draft policy per setting (as a serving daemon keeps one).
Prints tokens/s per run, the ratio on/off per configuration over the rounds, and the
median decode step from the daemon's side.

    python benchmarks/lookahead_ab.py [--rounds 3] [--streams 1,8] [--drafts 0,auto]
                                      [--max-tokens 64] [--force-acceptance P]

Written for issue 24 (docs/performance.md, session 32). Run it alone.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from mtpd.bench.commands import DEFAULT_PROMPTS
from mtpd.bench.runner import ForcedAcceptance, decode_steps, run_config
from mtpd.daemon.coordinator import Coordinator, Settings
from mtpd.daemon.draft_policy import AUTO, DraftPolicy
from mtpd.daemon.pipeline import PipelineConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", default="1,8")
    p.add_argument("--drafts", default="0,auto")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quant", default="int4")
    p.add_argument("--threads", type=int, default=None, help="the worker's (default: all cores)")
    p.add_argument("--force-acceptance", type=float, default=None)
    args = p.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    drafts = [AUTO if d == "auto" else int(d) for d in args.drafts.split(",")]
    settings = Settings(
        pipeline=PipelineConfig(workers=1, quant=args.quant, device="cpu", threads=args.threads),
        draft_tokens=AUTO,
    )
    rates: dict[tuple, list[float]] = {}
    steps_ms: dict[tuple, list[float]] = {}
    with Coordinator.start(settings) as daemon:
        tok = daemon.tokenizer
        prompts = [tok.encode_chat([{"role": "user", "content": t}])[1] for t in DEFAULT_PROMPTS]
        source = None
        if args.force_acceptance is not None:
            plain = run_config(daemon.pipeline, prompts, 0, 8, args.max_tokens)
            references = [(p, r.token_ids) for p, r in zip(prompts, plain.results, strict=True)]
            source = ForcedAcceptance(references, daemon.cfg.vocab_size, args.force_acceptance)
        policies = {(d, on): DraftPolicy(d) for d in drafts for on in (True, False)}
        run_config(daemon.pipeline, prompts[:1], 0, 1, 8)  # warm-up
        for r in range(args.rounds):
            for n, draft in itertools.product(streams, drafts):
                for on in (True, False) if r % 2 == 0 else (False, True):
                    run = run_config(
                        daemon.pipeline,
                        prompts * (2 if n > 1 else 1),
                        draft,
                        n,
                        args.max_tokens,
                        policy=policies[draft, on] if draft == AUTO else None,
                        draft_source=source,
                        lookahead=on,
                    )
                    key = (n, draft, on)
                    rates.setdefault(key, []).append(run.throughput)
                    steps_ms.setdefault(key, []).extend(
                        1e3 * s.outcome.cost for s in decode_steps(run.steps)
                    )
                    print(
                        f"round {r} streams {n} drafts {draft} lookahead {'on ' if on else 'off'}"
                        f" {run.throughput:7.1f} tok/s",
                        flush=True,
                    )
    print(
        f"{args.quant}, {args.threads or 'all'} worker threads, force acceptance "
        f"{args.force_acceptance}: on / off per round"
    )
    for n, draft in itertools.product(streams, drafts):
        on, off = rates[n, draft, True], rates[n, draft, False]
        ratios = " ".join(f"{a / b:.3f}" for a, b in zip(on, off, strict=True))
        print(
            f"  streams {n} drafts {draft}: off {statistics.mean(off):7.1f} tok/s, "
            f"on/off {ratios}  (mean {statistics.mean(on) / statistics.mean(off):.3f}); "
            f"median step cost ms off {statistics.median(steps_ms[n, draft, False]):.3f} "
            f"on {statistics.median(steps_ms[n, draft, True]):.3f}"
        )


if __name__ == "__main__":
    main()
