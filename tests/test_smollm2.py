"""The embedded default model: our GGUF path against transformers' own GGUF loading, and
the one-command experience a new user gets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mtpd.model.default_model import default_model_path
from mtpd.model.tokenizer import IncrementalDecoder
from mtpd.train.engine import Engine


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(None, dtype=torch.float32, max_context=512)


def test_logits_match_transformers_gguf_loading(engine, smollm2_reference):
    tok = engine.tokenizer
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "Name three colours."}]))
    with torch.no_grad():
        want = smollm2_reference(torch.tensor([prompt])).logits[0]
    got = engine.forward("s", 0, prompt, all_logits=True)
    assert (got - want).abs().max() <= 1e-3
    # Decode steps through the cache, against the reference's full recomputation.
    seq = list(prompt)
    for _ in range(4):
        seq.append(int(got[-1].argmax()))
        got = engine.forward("s", len(seq) - 1, seq[-1:], all_logits=True)
        with torch.no_grad():
            want = smollm2_reference(torch.tensor([seq])).logits[0, -1]
        assert (got[-1] - want).abs().max() <= 1e-3
    engine.release("s")


def test_run_answers_paris():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtpd.cli",
            "run",
            "What is the capital of France?",
            "--max-tokens",
            "32",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout)
    assert "Paris" in result["text"]
    assert result["n_tokens"] == len(result["token_ids"]) > 0
    assert result["model"] == str(default_model_path())
    for key in ("tokens_per_s", "elapsed_s"):
        assert result[key] > 0


def test_streamed_text_never_splits_a_character(engine):
    tok = engine.tokenizer
    text = "naïve café 🚀🔥 日本語 — done"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push([i]) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # some token ended mid-character and waited


@pytest.mark.parametrize("step", [1, 3, 7])
def test_steps_of_several_tokens_stream_whole_characters_and_stop_exactly(engine, step):
    """As when MTP drafts are accepted: a step brings several tokens at once."""
    from mtpd.daemon.generation import Generation
    from mtpd.daemon.options import GenerationOptions
    from mtpd.daemon.request import Accepted, Request

    tok = engine.tokenizer
    text = "naïve café 🚀🔥 日本語 — done, and more text after it"
    ids = tok.encode(text)
    for stop, want in (("日本", text[: text.index("日本")]), ("zzz", text)):
        request = Request("t", 64)
        generation = Generation(tok, request, 0, GenerationOptions(stop=(stop,)), "t", "auto", 0.0)
        chunks = []
        for i in range(0, len(ids), step):
            chunks.append(generation.chunk(Accepted(ids[i : i + step], step - 1)))
            if generation.stopped:
                break
        request._finish("length")  # as the scheduler does after the last token
        chunks.append(generation.last_chunk())
        assert "".join(c.text for c in chunks) == want
        assert not any("\ufffd" in c.text for c in chunks)
        kept = [t for c in chunks for t in c.token_ids]
        if stop in text:  # counted up to the token that completes the stop, no further
            assert stop in tok.decode(kept) and stop not in tok.decode(kept[:-1])
        else:
            assert kept == ids
        assert chunks[-1].usage.completion_tokens == len(kept)
        # A step's drafts come first: a cut step keeps only drafts.
        assert all(c.accepted_drafts == min(step - 1, len(c.token_ids)) for c in chunks[:-1])
