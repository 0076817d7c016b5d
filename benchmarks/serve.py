"""What the public interface costs: the same requests through `mtpd serve` (gRPC over
the unix socket, the SDK, detokenization and streaming) and through the daemon's own
request path in one process (no gRPC front), side by side in one run.

    python benchmarks/serve.py [--model M] [--workers 2] [--streams 1 8] [--tokens 64]
                               [--rounds 2] [--json OUT]

Each round runs, for each stream count, both ways (alternating which goes first),
greedy, `--tokens` tokens per stream (end-of-sequence ignored). Reports aggregate
tokens/s per way and the ratio served / in-process (1.0: the front costs nothing).
The served daemon and the in-process pipeline are never up at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mtpd.bench.commands import DEFAULT_PROMPTS as QUESTIONS
from mtpd.client import AsyncClient, Client
from mtpd.daemon.coordinator import Coordinator, Settings
from mtpd.daemon.frontend import Frontend
from mtpd.daemon.generation import Prompt
from mtpd.daemon.options import GenerationOptions
from mtpd.daemon.pipeline import PipelineConfig


async def in_process(daemon: Coordinator, streams: int, tokens: int) -> float:
    options = GenerationOptions(max_tokens=tokens, ignore_eos=True)
    prompts = [daemon.tokenizer.encode(QUESTIONS[i % len(QUESTIONS)]) for i in range(streams)]
    front = Frontend.around(daemon)

    async def one(prompt: list[int]) -> int:
        n = 0
        async with contextlib.aclosing(front.generate_here(Prompt(prompt), options)) as chunks:
            async for chunk in chunks:
                n += len(chunk.token_ids)
        return n

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(one(p) for p in prompts)))
    return total / (time.perf_counter() - start)


async def served(address: str, streams: int, tokens: int) -> float:
    async with AsyncClient(address) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                client.generate(QUESTIONS[i % len(QUESTIONS)], max_tokens=tokens, ignore_eos=True)
                for i in range(streams)
            )
        )
        return sum(r.completion_tokens for r in results) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    settings = Settings(
        model=args.model,
        pipeline=PipelineConfig(workers=args.workers, device="cpu", max_context=512),
    )
    rates: dict[tuple[str, int], list[float]] = {}

    def record(way: str, n: int, rate: float) -> None:
        rates.setdefault((way, n), []).append(rate)

    def run_in_process() -> None:
        with Coordinator.start(settings) as daemon:
            asyncio.run(in_process(daemon, 1, 4))  # warm-up
            for n in args.streams:
                record("in_process", n, asyncio.run(in_process(daemon, n, args.tokens)))

    def run_served() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            socket = Path(tmp) / "mtpd.sock"
            cmd = [sys.executable, "-P", "-m", "mtpd", "serve", "--socket", str(socket)]
            cmd += ["--workers", str(args.workers), "--device", "cpu", "--max-context", "512"]
            cmd += ["--model", args.model] if args.model else []
            process = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
            try:
                with Client(str(socket)) as client:
                    client.wait_ready(timeout=300)
                asyncio.run(served(str(socket), 1, 4))  # warm-up
                for n in args.streams:
                    record("served", n, asyncio.run(served(str(socket), n, args.tokens)))
            finally:
                process.terminate()
                process.wait(timeout=60)

    for r in range(args.rounds):  # alternate which way goes first
        for run in (run_in_process, run_served) if r % 2 == 0 else (run_served, run_in_process):
            run()
    report = []
    for n in args.streams:
        here = statistics.median(rates[("in_process", n)])
        there = statistics.median(rates[("served", n)])
        report.append(
            {
                "streams": n,
                "in_process_tok_s": round(here, 2),
                "served_tok_s": round(there, 2),
                "served_over_in_process": round(there / here, 3),
            }
        )
        print(
            f"{n:2d} streams: in-process {here:7.2f} tok/s, served {there:7.2f} tok/s, "
            f"ratio {there / here:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
