"""Where a pipeline step's time goes, and how throughput grows with concurrent streams.

    python benchmarks/pipeline.py [--model M] [--workers 2] [--transport dist|grpc]
                                  [--split A,B] [--tokens 64] [--json OUT]

1. One stream, greedy decoding: per decode step, the compute of each stage, the
   transport of each hop (activations in hand at stage i+1 minus compute done at
   stage i; the workers' time.monotonic() clocks are the host's CLOCK_MONOTONIC), and
   the control overhead: the step's time at the daemon (submit to tail reply) minus
   all compute and transport — gRPC hops, scheduling, serialisation.
2. Aggregate tokens/s at 1, 2, 4 and 8 concurrent streams (distinct prompts, fixed
   length), in one run with one pipeline, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import time

from mtpd.bench.commands import DEFAULT_PROMPTS
from mtpd.bench.runner import step_split
from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.default_model import resolve_model
from mtpd.model.sampling_params import SamplingParams
from mtpd.model.tokenizer import Tokenizer


def aggregate_rate(scheduler: Scheduler, prompts: list[list[int]], streams: int, n: int) -> float:
    start = time.perf_counter()
    requests = [
        scheduler.submit(prompts[i % len(prompts)], SamplingParams(), n, ignore_eos=True)
        for i in range(streams)
    ]
    tokens = sum(len(r.result(timeout=1800).token_ids) for r in requests)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--transport", choices=["dist", "grpc"], default="dist")
    ap.add_argument("--split", default=None, help="layers per worker, like 19,11")
    ap.add_argument("--threads", type=int, default=None, help="per worker")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    path = resolve_model(args.model)
    ckpt = open_checkpoint(path)
    cfg = read_config(ckpt)
    tok = Tokenizer.from_checkpoint(ckpt, cfg)
    prompts = [
        tok.encode(tok.render_chat([{"role": "user", "content": q}])) for q in DEFAULT_PROMPTS[:8]
    ]
    pipeline = Pipeline.start(
        PipelineConfig(
            model=str(path),
            num_layers=cfg.num_layers,
            workers=args.workers,
            device="cpu",
            transport=args.transport,
            split=args.split,
            threads=args.threads,
            max_seqs=8,
            max_context=512,
        )
    )
    with pipeline:
        scheduler = Scheduler(pipeline, eos_ids=set())
        aggregate_rate(scheduler, prompts, 1, 8)  # warm-up
        scheduler.recent_steps.clear()
        single = aggregate_rate(scheduler, prompts, 1, args.tokens)
        split = step_split(list(scheduler.recent_steps))
        rates = {1: single}
        for streams in (2, 4, 8):
            rates[streams] = aggregate_rate(scheduler, prompts, streams, args.tokens)
        scheduler.close()

    result = {
        "model": str(path),
        "workers": args.workers,
        "transport": args.transport,
        "layers_per_worker": [s.end_layer - s.first_layer for s in pipeline.stages],
        "threads_per_worker": args.threads,
        "single_stream": split,
        "tokens_per_s_by_streams": {k: round(v, 2) for k, v in rates.items()},
        "throughput_4_over_1": round(rates[4] / rates[1], 3),
        "throughput_8_over_1": round(rates[8] / rates[1], 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
