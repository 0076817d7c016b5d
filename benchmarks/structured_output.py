"""What structured output costs: the daemon's time on a request's grammar per generated
token (the masks of every sampled position, cutting drafts, consuming the accepted
tokens), and decode speed with and without a JSON schema, MTP off and on, interleaved
in one daemon so the ratios hold on a noisy machine.

    python benchmarks/structured_output.py [--quant int4] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections import defaultdict

from mtpd.daemon.coordinator import Coordinator, Settings
from mtpd.daemon.draft_policy import AUTO
from mtpd.daemon.frontend import Frontend
from mtpd.daemon.generation import Prompt
from mtpd.daemon.options import GenerationOptions, OutputFormat
from mtpd.daemon.pipeline import PipelineConfig
from mtpd.daemon.structured_output import Constraint

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 30},
            "maxItems": 4,
        },
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
QUESTIONS = [
    "Describe a fictional person as JSON with their name, age, city and hobbies.",
    "Invent a character for a novel; give name, age, city and hobbies in JSON.",
    "Give me a JSON profile of a retired sailor: name, age, city, hobbies.",
]
MAX_TOKENS = 128


class Timed:
    """Wraps Constraint's methods to add up the scheduler thread's time in them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def install(self) -> None:
        original_mask = Constraint._mask

        def counted(self_):
            self.calls["rows"] += 1
            return original_mask(self_)

        Constraint._mask = counted
        for name in ("masks", "allowed_drafts", "consume"):
            original = getattr(Constraint, name)

            def timed(self_, *args, _original=original, _name=name):
                start = time.perf_counter()
                try:
                    return _original(self_, *args)
                finally:
                    self.seconds[_name] += time.perf_counter() - start
                    self.calls[_name] += 1

            setattr(Constraint, name, timed)


async def one(daemon: Coordinator, ids: list[int], constrained: bool, draft: int | None):
    options = GenerationOptions(
        max_tokens=MAX_TOKENS,
        draft_tokens=draft,
        structured_output=OutputFormat("json_schema", json.dumps(SCHEMA)) if constrained else None,
    )
    tokens, first, text = 0, None, ""
    generation = Frontend.around(daemon).generate_here(Prompt(ids), options)
    async with contextlib.aclosing(generation) as chunks:
        async for chunk in chunks:
            if chunk.token_ids and first is None:
                first = time.perf_counter()
                tokens -= len(chunk.token_ids)  # the rate counts the tokens after the first
            tokens += len(chunk.token_ids)
            text += chunk.text
    return tokens / (time.perf_counter() - first), text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    timed = Timed()
    timed.install()
    settings = Settings(
        model=args.model,
        pipeline=PipelineConfig(quant=args.quant, max_seqs=1),
        draft_tokens=AUTO,
    )
    configs = [(c, d) for c in (False, True) for d in (0, None)]  # None: the auto policy
    rates: dict[tuple[bool, int | None], list[float]] = defaultdict(list)
    tokens_constrained = 0
    with Coordinator.start(settings) as daemon:
        prompts = [
            daemon.tokenizer.encode_chat([{"role": "user", "content": q}])[1] for q in QUESTIONS
        ]
        asyncio.run(one(daemon, prompts[0], True, 0))  # warm: kernels, llguidance's vocabulary
        timed.seconds.clear()
        timed.calls.clear()
        for _ in range(args.rounds):
            for ids in prompts:
                for constrained, draft in configs:
                    rate, text = asyncio.run(one(daemon, ids, constrained, draft))
                    rates[(constrained, draft)].append(rate)
                    if constrained:
                        json.loads(text)  # complete and valid, or this run is wrong
                        tokens_constrained += len(daemon.tokenizer.encode(text))
    name = {0: "MTP off", None: "MTP auto"}
    result = {
        f"{'schema' if c else 'free'} {name[d]} tok/s": round(statistics.median(r), 1)
        for (c, d), r in rates.items()
    }
    for d in (0, None):
        free, schema = statistics.median(rates[(False, d)]), statistics.median(rates[(True, d)])
        result[f"schema / free, {name[d]}"] = round(schema / free, 3)
    result["grammar us per constrained token"] = round(
        sum(timed.seconds.values()) / tokens_constrained * 1e6, 1
    )
    for key, seconds in timed.seconds.items():
        result[f"{key} us per call"] = round(seconds / timed.calls[key] * 1e6, 1)
    result["mask rows per masks call"] = round(timed.calls["rows"] / timed.calls["masks"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
