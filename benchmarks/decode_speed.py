"""Single-stream decode speed of mtpd's engine against transformers on the same weights,
and the cost of verifying drafts: time(5 new tokens) / time(1 new token) at a 256-token
context. Engines run interleaved in one process, so the ratios hold on a noisy machine.

    python benchmarks/decode_speed.py [--model M] [--max-tokens 128] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mtpd.bench.peers import TransformersPeer
from mtpd.model.default_model import resolve_model
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine

PROMPTS = [
    "What is the capital of France?",
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash table works, with an example in Python.",
]


def mtpd_decode_rate(engine: Engine, prompt: list[int], n: int) -> float:
    gen = engine.generate(prompt, SamplingParams(), n, ignore_eos=True)
    next(gen)  # prefill and first token
    start = time.perf_counter()
    count = sum(1 for _ in gen)
    return count / (time.perf_counter() - start)


def verify_cost_ratio(engine: Engine, context: int = 256, reps: int = 30) -> dict[str, float]:
    """Median step time appending 1 and 5 tokens to a `context`-token cache, interleaved."""
    seq = "ratio"
    engine.forward(seq, 0, [7] * context)
    times: dict[int, list[float]] = {1: [], 5: []}
    for _ in range(reps):
        for t in (1, 5):
            start = time.perf_counter()
            engine.forward(seq, context, [11] * t, all_logits=True)
            times[t].append(time.perf_counter() - start)
    engine.release(seq)
    one, five = statistics.median(times[1]), statistics.median(times[5])
    return {"step_ms_1": one * 1e3, "step_ms_5": five * 1e3, "ratio_5_over_1": five / one}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)

    results: dict[str, dict] = {"model": str(path), "threads": args.threads}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        engine = Engine.load(path, dtype=dtype, max_context=1024)
        hf = TransformersPeer(path, dtype)
        tok = engine.tokenizer
        prompts = [tok.encode(tok.render_chat([{"role": "user", "content": p}])) for p in PROMPTS]
        rates: dict[str, list[float]] = {"mtpd": [], "transformers": []}
        for _ in range(args.rounds):
            for prompt in prompts:  # interleaved: each pair sees the same machine state
                rates["mtpd"].append(mtpd_decode_rate(engine, prompt, args.max_tokens))
                rates["transformers"].append(hf.decode_rate(prompt, args.max_tokens))
        row = {name: statistics.median(r) for name, r in rates.items()}
        row["speedup"] = row["mtpd"] / row["transformers"]
        row.update(verify_cost_ratio(engine))
        results[dtype_name] = row
        print(
            f"{dtype_name:>9}: mtpd {row['mtpd']:6.1f} tok/s | transformers {row['transformers']:6.1f} tok/s"
            f" | ratio {row['speedup']:.2f}x | step 1 tok {row['step_ms_1']:.1f} ms, 5 tok "
            f"{row['step_ms_5']:.1f} ms: verify-4-drafts cost {row['ratio_5_over_1']:.2f}x",
            flush=True,
        )
        del engine, hf
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
