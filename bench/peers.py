"""Other engines on the same weights, for `mtpd bench --peer`: transformers' `generate`
(the `test` extra installs it) and llama.cpp through llama-cpp-python (GGUF models only;
install it yourself: it builds from source). Each measures single-stream greedy decode
tokens/s the way mtpd's own runs do: tokens after the first over the time after it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mtpd.model.errors import InputError

PEERS = ("transformers", "llama.cpp")


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


def load_peer(name: str, model: Path, threads: int) -> TransformersPeer | LlamaCppPeer:
    if name == "transformers":
        return TransformersPeer(model)
    if name == "llama.cpp":
        return LlamaCppPeer(model, threads)
    raise InputError(f"--peer: unknown peer {name!r} (known: {', '.join(PEERS)})")
