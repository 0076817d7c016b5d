"""The KV cache's element type side by side in one process: float16 (the default under
--quant) against int8 (`--kv-cache int8`), whole-model steps of N sequences x 1 row at a
few context lengths over one model's two caches, alternating (the order turning each
rep), with what each cache holds for a sequence.

    python benchmarks/kv_cache.py [--quant int4] [--streams 1,8] [--contexts 200,1000]
                                  [--reps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_paths import step  # this folder's: a script's own folder is on sys.path

from mtpd.train.engine import Engine

CACHES = {"float16": torch.float16, "int8": torch.int8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--contexts", default="200,1000")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    streams = [int(n) for n in args.streams.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, max_context=max(contexts) + 1, quant=args.quant)
    stack, caches = engine.shard.stack, {}
    for name, dtype in CACHES.items():
        if not stack.use_kernel_cache(dtype):
            raise SystemExit(f"the CPU kernels do not run every layer here: no {name} cache")
        # A step leaves its sequences a position longer: each context has its own.
        caches[name] = stack.new_cache(max(streams) * len(contexts))
    seqs = {c: [f"{c}-{i}" for i in range(max(streams))] for c in contexts}
    with torch.inference_mode():
        for cache in caches.values():
            for context, names in seqs.items():
                for name in names:
                    engine.shard(torch.full((context,), 7), cache, [cache.slot(name)], [context])
        shapes = [(n, c) for c in contexts for n in streams]
        times = {(name, shape): [] for name in CACHES for shape in shapes}
        order = list(CACHES)
        for _ in range(args.reps):
            order = order[1:] + order[:1]
            for n, context in shapes:
                for name in order:
                    start = time.perf_counter()
                    step(engine, seqs[context][:n], context, 1, caches[name])
                    times[name, (n, context)].append(time.perf_counter() - start)
    first = next(iter(CACHES))
    # What a cache holds a position of a sequence (an int8 one's positions padded).
    per_position = {n: c.nbytes / c.max_seqs / c.k.shape[-2] for n, c in caches.items()}
    for n, context in shapes:
        ms = {name: statistics.median(times[name, (n, context)]) * 1e3 for name in CACHES}
        print(
            f"{args.quant}, {n} sequence(s) x 1 row at {context} positions: "
            + "  ".join(
                f"{name} cache {ms[name]:6.2f} ms ({ms[name] / ms[first]:.2f}x, "
                f"{per_position[name] * context / 1e6:.1f} MB a sequence)"
                for name in CACHES
            )
        )


if __name__ == "__main__":
    main()
