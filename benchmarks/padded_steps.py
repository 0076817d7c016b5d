"""The padded step (what CUDA graphs replay, worker/cuda_graphs.py) against the
per-sequence path, run eagerly on the same shard: B sequences of `--context` cached
positions each appending T tokens, alternating the two paths, median ms per step.

    python benchmarks/padded_steps.py [--model M] [--sequences 8] [--tokens 1,4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtpd.train.engine import Engine
from mtpd.worker.cuda_graphs import StepGraphs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--tokens", default="1,4", help="new tokens per sequence, a list")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    engine = Engine.load(args.model, max_seqs=1, max_context=1024, device=args.device)
    shard, n = engine.shard, args.sequences
    cache = shard.new_cache(n, 1024, scratch_slot=True)
    padded = StepGraphs(shard, cache, capture=False)
    slots = [cache.slot(str(i)) for i in range(n)]
    vocab = shard.cfg.vocab_size
    with torch.inference_mode():
        for slot in slots:
            prompt = torch.arange(args.context, device=shard.device) % vocab
            shard(prompt, cache, [slot], [args.context])
        for t in (int(x) for x in args.tokens.split(",")):
            x = torch.arange(n * t, device=shard.device) % vocab
            times: dict[str, list[float]] = {"per-sequence": [], "padded": []}
            for i in range(2 * args.repeats + 4):
                for slot in slots:
                    cache.truncate(slot, args.context)
                mode = "padded" if i % 2 else "per-sequence"
                start = time.perf_counter()
                if mode == "padded":
                    padded.run(x, slots, [t] * n)
                else:
                    shard(x, cache, slots, [t] * n)
                if i >= 4:  # the first of each are warm-up
                    times[mode].append(time.perf_counter() - start)
            print(
                f"{n} sequences × {t} tokens: "
                + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items())
            )


if __name__ == "__main__":
    main()
