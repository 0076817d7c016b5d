"""A multi-turn chat as a chat front end sends it: every turn resends the whole
conversation through the OpenAI API (the openai SDK, streamed, greedy, 64 tokens
answered). Time to first token per turn, for `mtpd serve` with prefix caching on and
off and, given its binary, llama.cpp's `llama-server` (prompt cache on by default), each
server alone, one after the other, on the embedded default model.

    python benchmarks/chat_turns.py [--quant int4] [--turns 10] \
        [--llama-server PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai

from mtpd.model.default_model import resolve_model

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Name a primary colour.",
    "What is two plus three?",
    "Which planet is closest to the sun?",
    "What do bees make?",
    "What language is spoken in Brazil?",
    "How many days are in a week?",
    "What is frozen water called?",
    "Which animal is known as the king of the jungle?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(base_url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(Exception):
            client.models.list()
            return
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


@contextlib.contextmanager
def _served(cmd: list[str], port: int, log: Path | None = None) -> Iterator[str]:
    """Run a server's command; its OpenAI API's base URL once it answers."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    process = subprocess.Popen(cmd, stdout=out, stderr=out)
    try:
        _wait(f"http://127.0.0.1:{port}/v1", process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=60)
        if log:
            out.close()


def mtpd_server(quant: str, prefix_cache: bool):
    port = _free_port()
    work = Path(tempfile.mkdtemp())
    cmd = [sys.executable, "-m", "mtpd", "serve", "--http", f"127.0.0.1:{port}"]
    cmd += ["--socket", str(work / "mtpd.sock"), "--quant", quant, "--max-seqs", "4"]
    cmd += ["--prefix-cache" if prefix_cache else "--no-prefix-cache"]
    return _served(cmd, port, work / "log")


def llama_server(binary: str):
    port = _free_port()
    model = str(resolve_model(None))
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", "2"]
    # --no-repack: this build's repacked CPU weights crash it on these machines (as
    # llama-cpp-python 0.3.36 crashes on its first generation); llama-bench is unaffected.
    cmd += ["-c", "4096", "--jinja", "--no-repack"]
    return _served(cmd, port)


def chat(base_url: str, turns: int, max_tokens: int) -> list[float]:
    """Time to first token of each turn, in seconds."""
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    messages: list[dict] = [{"role": "system", "content": "Answer briefly."}]
    ttfts = []
    for turn in range(turns):
        asked = " ".join(QUESTIONS[(3 * turn + i) % len(QUESTIONS)] for i in range(3))
        messages.append({"role": "user", "content": asked})
        start, first, reply = time.perf_counter(), None, ""
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                reply += chunk.choices[0].delta.content
        ttfts.append((first or time.perf_counter()) - start)
        messages.append({"role": "assistant", "content": reply})
    return ttfts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    servers = {
        f"mtpd {args.quant}, prefix cache": lambda: mtpd_server(args.quant, True),
        f"mtpd {args.quant}, no prefix cache": lambda: mtpd_server(args.quant, False),
    }
    if args.llama_server:
        servers["llama-server"] = lambda: llama_server(args.llama_server)
    results = {}
    for name, start in servers.items():
        with start() as url:
            chat(url, 1, 8)  # warm: kernels, the first request's one-off costs
            results[name] = chat(url, args.turns, args.max_tokens)
    width = max(map(len, results))
    print(
        f"{'time to first token (s), turn':{width}} "
        + " ".join(f"{t + 1:>5}" for t in range(args.turns))
    )
    for name, ttfts in results.items():
        print(f"{name:{width}} " + " ".join(f"{t:5.2f}" for t in ttfts))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
