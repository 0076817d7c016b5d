"""How much a quantized model departs from its own float reference (`mtpd bench
--quant`, `--kv-cache`): on the float model's greedy continuations of the benchmark prompts, each
model's perplexity, and how often the quantized model's top token is the float model's
(teacher-forced: both see the same text, so one early difference does not decide the
rest)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mtpd.model.checkpoint import open_checkpoint
from mtpd.model.quant import requantization_error
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine


def _logits(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """Logits [T - 1, V] predicting tokens[1:]."""
    try:
        return engine.forward("quality", 0, tokens[:-1], all_logits=True).float()
    finally:
        engine.release("quality")


def quantization_quality(
    model: Path,
    quant: str,
    kv_cache: str,
    dtype: torch.dtype,
    prompts: list[list[int]],
    tokens: int,
) -> dict:
    context = max(len(p) for p in prompts) + tokens + 1
    reference = Engine.load(model, dtype=dtype, max_context=context)
    quantized = Engine.load(model, dtype=dtype, max_context=context, quant=quant, kv_cache=kv_cache)
    nll = {"float": 0.0, quant: 0.0}
    agree = count = 0
    with torch.inference_mode():
        for prompt in prompts:
            continuation = reference.generate(prompt, SamplingParams(), tokens, ignore_eos=True)
            text = prompt + list(continuation)
            targets = torch.tensor(text[len(prompt) :])
            rows = slice(len(prompt) - 1, len(text) - 1)
            ref_logits = _logits(reference, text)[rows]
            q_logits = _logits(quantized, text)[rows]
            for name, logits in (("float", ref_logits), (quant, q_logits)):
                nll[name] += float(
                    torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                )
            agree += int((q_logits.argmax(-1) == ref_logits.argmax(-1)).sum())
            count += len(targets)
    return {
        "quant": quant,
        "kv_cache": kv_cache,
        "positions": count,
        "perplexity": {name: round(math.exp(v / count), 4) for name, v in nll.items()},
        "top1_agreement": round(agree / count, 4),
        "requantized_8bit": requantized_8bit(model),
    }


def requantized_8bit(model: Path) -> dict[str, float]:
    """Per tensor stored with 8-bit blocks (GGUF Q8_0): the relative RMS error of its
    requantization to int8 with one scale per output channel."""
    ckpt = open_checkpoint(model)
    names = sorted(n for n in ckpt.tensor_names() if ckpt.stored_at_8_bits((n,)))
    return {
        name: round(requantization_error(w), 6)
        for name, w in ckpt.read(names).items()
        if w.dim() == 2
    }
