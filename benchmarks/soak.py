"""A soak: concurrent clients against `mtpd serve` while a worker is killed at a fixed
interval. Reports requests served and failed (goal: 0 failed), latency percentiles,
worker restarts, and the daemon's resident memory at start and end (goal: flat). With
--turns N each client holds N-turn chats (the history resent every turn), and the
report adds the prefix cache's hit rate (prompt tokens taken from a cache).

    python benchmarks/soak.py [--model M] [--workers 2] [--clients 32] [--minutes 5]
                              [--kill-every 30] [--tokens 32] [--turns N] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from mtpd.client import AsyncClient, Client, MtpdError

PROMPTS = [
    "Tell me about the sea.",
    "What is a prime number?",
    "Write two lines about trains.",
    "Why do leaves fall?",
]


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return process.memory_info().rss


async def client_loop(address: str, stop_at: float, tokens: int, turns: int, log: dict) -> None:
    rng = random.Random()
    messages: list[dict] = []
    async with AsyncClient(address, timeout=600) as client:
        while time.monotonic() < stop_at:
            start = time.monotonic()
            try:
                if not turns:
                    await client.generate(rng.choice(PROMPTS), max_tokens=tokens, ignore_eos=True)
                else:
                    if len(messages) >= 2 * turns:
                        messages = []  # a new conversation
                    messages.append({"role": "user", "content": rng.choice(PROMPTS)})
                    reply = await client.chat(messages, max_tokens=tokens, ignore_eos=True)
                    messages.append({"role": "assistant", "content": reply.text})
                log["latency"].append(time.monotonic() - start)
            except MtpdError as e:
                log["failed"].append(str(e)[:200])
                messages = []


async def killer(address: str, stop_at: float, every: float, log: dict) -> None:
    rng = random.Random(0)
    while time.monotonic() + every < stop_at:
        await asyncio.sleep(every)
        with Client(address, timeout=30) as client:
            workers = client.info().workers
        victim = rng.choice(workers)
        os.kill(victim.pid, signal.SIGKILL)
        log["kills"].append(victim.rank)


async def soak(args: argparse.Namespace, address: str, daemon_pid: int) -> dict:
    log: dict = {"latency": [], "failed": [], "kills": []}
    rss_start = tree_rss(daemon_pid)
    stop_at = time.monotonic() + args.minutes * 60
    await asyncio.gather(
        killer(address, stop_at, args.kill_every, log),
        *(client_loop(address, stop_at, args.tokens, args.turns, log) for _ in range(args.clients)),
    )
    with Client(address) as client:
        stats = client.stats()
    restarts = sum(w.restarts for w in stats.workers)
    lat = sorted(log["latency"])
    return {
        "served": len(lat),
        "failed": len(log["failed"]),
        "failures": log["failed"][:5],
        "kills": len(log["kills"]),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
        "daemon_rss_start_mb": round(rss_start / 2**20, 1),
        "daemon_rss_end_mb": round(tree_rss(daemon_pid) / 2**20, 1),
        "completion_tokens": stats.completion_tokens,
        "restarts": restarts,
        "prompt_tokens": stats.prompt_tokens,
        "prefix_cache_hit_rate": round(stats.cached_prompt_tokens / max(stats.prompt_tokens, 1), 3),
        "prefix_caches_kept": stats.prefix_caches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--kill-every", type=float, default=30)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=0, help="chat turns per conversation")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        socket = Path(tmp) / "mtpd.sock"
        cmd = [sys.executable, "-P", "-m", "mtpd", "serve", "--socket", str(socket)]
        cmd += ["--workers", str(args.workers), "--device", "cpu", "--max-context", "512"]
        cmd += ["--max-seqs", str(args.clients), "--max-restarts", "1000"]
        cmd += ["--model", args.model] if args.model else []
        log = (Path(tmp) / "daemon.log").open("w")
        process = subprocess.Popen(cmd, stderr=log)
        try:
            with Client(str(socket)) as client:
                client.wait_ready(timeout=300)
            report = asyncio.run(soak(args, str(socket), process.pid))
        finally:
            process.terminate()
            process.wait(timeout=120)
            log.close()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
