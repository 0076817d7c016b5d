"""Training data for an MTP head: the frozen model's own continuations of prompts (and,
optionally, its reading of corpus text), with the final-normed hidden state and the
model's argmax prediction at every position.

Collected once, in shards on disk, resumable: a shard is written atomically and the
next run starts after the last complete one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtpd.model.errors import ModelLoadError
from mtpd.model.sampling import select_tokens
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine

SHARD_GLOB = "shard-*.safetensors"
PROMPT_SHARD_GLOB = "shard-[0-9]*.safetensors"  # the corpus's shard aside


@dataclass
class Record:
    """One sequence: hidden[i] and argmax[i] come from feeding tokens[i]; argmax[i] is
    the model's greedy prediction of tokens[i + 1]. tokens has one more entry than hidden."""

    tokens: list[int]
    hidden: torch.Tensor  # [L, H], or [L, H x (1 + taps)] from a tapped trunk
    argmax: list[int]


def continue_prompts(
    engine: Engine,
    prompts: Sequence[list[int]],
    max_new: int,
    params: Sequence[SamplingParams],
) -> list[Record]:
    """Continue every prompt in one batch (each weight read once per step for all), the
    i-th with params[i]: sampled rows need seeds of their own to differ."""
    shard, cache = engine.shard, engine.cache
    # A prompt is cut to leave room for one token, and a continuation ends where the
    # context does (a long passage in a request once stopped a whole collection).
    prompts = [list(p[: engine.max_context - 1]) for p in prompts]
    ids = [f"collect-{i}" for i in range(len(prompts))]
    slots = [cache.slot(s) for s in ids]
    tokens = [list(p) for p in prompts]
    hidden: list[list[torch.Tensor]] = [[] for _ in prompts]
    argmax: list[list[int]] = [[] for _ in prompts]
    try:
        with torch.inference_mode():
            feed = [list(p) for p in prompts]
            active = list(range(len(prompts)))
            for _ in range(max_new):
                flat = torch.tensor([t for i in active for t in feed[i]], device=shard.device)
                lengths = [len(feed[i]) for i in active]
                h = shard(flat, cache, [slots[i] for i in active], lengths)
                logits = shard.logits(h)
                best = logits.argmax(-1).tolist()
                # Only each row's last position is drawn from, all rows at once where the
                # logits are: a copy of every row to the CPU would cost more than the step.
                ends = list(itertools.accumulate(lengths))
                chosen = select_tokens(
                    logits[[e - 1 for e in ends]],
                    [params[i] for i in active],
                    [len(tokens[i]) for i in active],
                    [_history(tokens[i], params[i]) for i in active],
                    [len(prompts[i]) for i in active],
                )
                h = h.cpu().to(torch.bfloat16)
                still = []
                for i, end, n, token in zip(active, ends, lengths, chosen, strict=True):
                    hidden[i].append(h[end - n : end])
                    argmax[i].extend(best[end - n : end])
                    tokens[i].append(token)
                    room = len(tokens[i]) < engine.max_context
                    if token not in engine.tokenizer.eos_ids and room:
                        feed[i] = [token]
                        still.append(i)
                active = still
                if not active:
                    break
    finally:
        for s in ids:
            cache.release(s)
    return [
        Record(tokens[i][: sum(len(x) for x in hidden[i]) + 1], torch.cat(hidden[i]), argmax[i])
        for i in range(len(prompts))
    ]


def _history(tokens: list[int], params: SamplingParams) -> torch.Tensor:
    # Only penalties read the history: a tensor of every row's tokens on every step
    # would be built for nothing.
    if not params.processed:
        return _NO_HISTORY
    return torch.tensor(tokens)


_NO_HISTORY = torch.empty(0, dtype=torch.long)


def read_corpus_records(engine: Engine, texts: Sequence[str], chunk_tokens: int) -> list[Record]:
    """The model reading text (no generation): chunks of `chunk_tokens` tokens."""
    records = []
    with torch.inference_mode():
        for text in texts:
            ids = engine.tokenizer.encode(text)
            for start in range(0, len(ids) - 2, chunk_tokens):
                chunk = ids[start : start + chunk_tokens + 1]
                h = engine.shard(
                    torch.tensor(chunk[:-1], device=engine.shard.device),
                    engine.cache,
                    [engine.cache.slot("c")],
                    [len(chunk) - 1],
                )
                argmax = engine.shard.logits(h).argmax(-1).tolist()
                records.append(Record(chunk, h.cpu().to(torch.bfloat16), argmax))
                engine.cache.release("c")
    return records


def write_shard(path: Path, records: Sequence[Record]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(
        {
            "tokens": torch.tensor([t for r in records for t in r.tokens], dtype=torch.int32),
            "hidden": torch.cat([r.hidden for r in records]),
            "argmax": torch.tensor([a for r in records for a in r.argmax], dtype=torch.int32),
            "lengths": torch.tensor([len(r.argmax) for r in records], dtype=torch.int32),
        },
        str(tmp),
    )
    tmp.rename(path)  # atomic: a shard on disk is always complete


def _sequences_in(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("lengths").get_shape()[0]


def read_shards(work_dir: Path) -> Iterator[Record]:
    for path in sorted(work_dir.glob(SHARD_GLOB)):
        data = load_file(str(path))
        tok_off = hid_off = 0
        for n in data["lengths"].tolist():
            yield Record(
                data["tokens"][tok_off : tok_off + n + 1].tolist(),
                data["hidden"][hid_off : hid_off + n],
                data["argmax"][hid_off : hid_off + n].tolist(),
            )
            tok_off += n + 1
            hid_off += n


def _check_same_data(
    work_dir: Path,
    prompts: Sequence[str],
    corpus: Sequence[str],
    quant: str,
    taps: Sequence[int] = (),
) -> None:
    """A work dir resumes the collection it holds: its prompts may grow at the end (the
    model's own prompts are appended), but other prompts, another corpus, another trunk
    quantization or other tapped layers would silently train on the old data (or on
    rows of another width), so they are refused."""
    record = work_dir / "collected-from.json"
    corpus_digest = hashlib.sha256("\0".join(corpus).encode()).hexdigest()
    if record.exists():
        held = json.loads(record.read_text())
        same_start = held["prompts"] == list(prompts[: len(held["prompts"])])
        held_quant = held.get("quant", "none")  # collected before the choice existed
        held_taps = held.get("taps", [])
        if (
            not same_start
            or held["corpus"] != corpus_digest
            or held_quant != quant
            or held_taps != list(taps)
        ):
            raise ModelLoadError(
                f"{work_dir}: holds data collected from other prompts, another corpus or "
                f"another trunk (quant {held_quant}, taps {held_taps}); give another "
                f"--work-dir (or remove this one)"
            )
    record.write_text(
        json.dumps(
            {"prompts": list(prompts), "corpus": corpus_digest, "quant": quant, "taps": list(taps)}
        )
    )


def collect(
    engine: Engine,
    prompts: Sequence[str],
    work_dir: Path,
    *,
    batch: int,
    max_new: int,
    sampled_share: float,
    seed: int,
    corpus: Sequence[str] = (),
    quant: str = "none",
    progress: Callable[[int, int, int], None] | None = None,
) -> None:
    """Continue `prompts` (chat-templated) into shards of `batch` sequences each, on
    `engine`, whose trunk is quantized as `quant` says (recorded with the layers its
    shard taps: a work dir holds one of each).

    A share `sampled_share` of the batches samples at temperature 0.8 for
    variety; the targets stay the model's argmax at each position either way.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_same_data(work_dir, prompts, corpus, quant, engine.shard.tap_layers)
    tok = engine.tokenizer
    if corpus and not (work_dir / "corpus.done").exists():
        write_shard(work_dir / "shard-corpus.safetensors", read_corpus_records(engine, corpus, 256))
        (work_dir / "corpus.done").write_text("")
    # Counted in sequences, not shards: an earlier run's last shard may hold a short
    # batch, and prompts appended since then start right after it.
    shards = sorted(work_dir.glob(PROMPT_SHARD_GLOB))
    collected = sum(_sequences_in(path) for path in shards)
    first = len(shards)
    n_batches = first + (len(prompts) - collected + batch - 1) // batch
    for b in range(first, n_batches):
        offset = collected + (b - first) * batch
        chunk = prompts[offset : offset + batch]
        ids = [tok.encode(tok.render_chat([{"role": "user", "content": p}])) for p in chunk]
        sampled = random.Random(seed * 1_000_003 + b).random() < sampled_share
        params = [
            SamplingParams(temperature=0.8, seed=seed + b * batch + i)
            if sampled
            else SamplingParams()
            for i in range(len(ids))
        ]
        start = time.perf_counter()
        records = continue_prompts(engine, ids, max_new, params)
        write_shard(work_dir / f"shard-{b:05d}.safetensors", records)
        if progress:
            rate = sum(len(r.argmax) for r in records) / (time.perf_counter() - start)
            progress(b + 1, n_batches, int(rate))
    (work_dir / "collect.json").write_text(
        json.dumps({"prompts": len(prompts), "batches": n_batches})
    )
