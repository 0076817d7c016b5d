"""Other engines on the same weights, for `mtpd bench --peer`: transformers' `generate`
(the `test` extra installs it), llama.cpp through llama-cpp-python (GGUF models only;
install it yourself: it builds from source) and llama.cpp's own `llama-bench` program
(`llama-bench=PATH`; build it yourself). Each measures single-stream greedy decode
tokens/s; the first two the way mtpd's own runs do, tokens after the first over the time
after it, on the run's prompts."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import torch

from mtpd.model.errors import InputError

PEERS = ("transformers", "llama.cpp", "llama-bench[=PATH]")


class _FirstTokenClock:
    """A transformers streamer that timestamps the first generated token (transformers
    first sends the prompt)."""

    def __init__(self) -> None:
        self.calls, self.first = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class TransformersPeer:
    name = "transformers"

    def __init__(self, model: Path, dtype: torch.dtype = torch.float32) -> None:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise InputError(
                "--peer transformers needs the transformers package (pip install 'mtpd[test]')"
            ) from None
        kwargs = {"gguf_file": model.name} if model.suffix == ".gguf" else {}
        where = str(model.parent if model.suffix == ".gguf" else model)
        self.model = (
            AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
            .to(dtype)
            .eval()
        )

    def decode_rate(self, prompt: list[int], n: int) -> float:
        clock = _FirstTokenClock()
        with torch.no_grad():
            self.model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        return (n - 1) / (time.perf_counter() - clock.first)


class LlamaCppPeer:
    name = "llama.cpp"

    def __init__(self, model: Path, threads: int) -> None:
        if model.suffix != ".gguf":
            raise InputError("--peer llama.cpp runs GGUF models only")
        try:
            from llama_cpp import Llama
        except ImportError:
            raise InputError(
                "--peer llama.cpp needs llama-cpp-python (pip install llama-cpp-python; "
                "it builds llama.cpp from source)"
            ) from None
        self.model = Llama(model_path=str(model), n_threads=threads, n_ctx=2048, verbose=False)

    def decode_rate(self, prompt: list[int], n: int) -> float:
        self.model.reset()
        first = None
        count = 0
        for _ in self.model.generate(prompt, temp=0.0, top_k=1, reset=True):
            if first is None:
                first = time.perf_counter()
            count += 1
            if count == n:  # end-of-sequence ignored, as in mtpd's runs
                break
        return (count - 1) / (time.perf_counter() - first) if count > 1 else 0.0


class LlamaBenchPeer:
    """llama.cpp without Python around it: its `llama-bench` program generating `n` tokens
    from an empty context (`-p 0 -n N -r 1`, after its own warm-up), run anew for each of
    the run's prompts so that its rate samples the machine as often as mtpd's do. The
    prompt itself is not used: llama-bench has no way to take one."""

    name = "llama-bench"

    def __init__(self, model: Path, threads: int, program: str) -> None:
        if model.suffix != ".gguf":
            raise InputError("--peer llama-bench runs GGUF models only")
        found = shutil.which(program)
        if found is None:
            raise InputError(
                f"--peer llama-bench: no program {program!r} (build llama.cpp's llama-bench "
                "and give its path: --peer llama-bench=PATH; docs/bench.md)"
            )
        self.command = [found, "-m", str(model), "-t", str(threads), "-p", "0", "-r", "1"]
        self.command += ["-o", "json"]

    def decode_rate(self, prompt: list[int], n: int) -> float:
        done = subprocess.run(
            [*self.command, "-n", str(n)], capture_output=True, text=True, timeout=600
        )
        try:
            tests = json.loads(done.stdout) if done.returncode == 0 else None
            rate = float(tests[0]["avg_ts"]) if isinstance(tests, list) and tests else None
        except (ValueError, TypeError, KeyError):
            rate = None
        if rate is None or not rate > 0:
            said = (done.stderr or done.stdout).strip()[-500:]
            raise InputError(
                f"--peer llama-bench: {self.command[0]} exited {done.returncode} without a "
                f"decode rate: {said}"
            )
        return rate


def load_peer(
    name: str, model: Path, threads: int
) -> TransformersPeer | LlamaCppPeer | LlamaBenchPeer:
    if name == "transformers":
        return TransformersPeer(model)
    if name == "llama.cpp":
        return LlamaCppPeer(model, threads)
    if name == "llama-bench" or name.startswith("llama-bench="):
        return LlamaBenchPeer(model, threads, name.partition("=")[2] or "llama-bench")
    raise InputError(f"--peer: unknown peer {name!r} (known: {', '.join(PEERS)})")
