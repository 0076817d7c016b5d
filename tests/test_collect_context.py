"""Collecting a head's training data never runs past the model's context: a request
longer than it is cut, and a continuation ends where the context does."""

from __future__ import annotations

from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.model.sampling_params import SamplingParams
from mtpd.train.collect import continue_prompts
from mtpd.train.engine import Engine


def test_continuations_stop_at_the_context(tmp_path):
    write_tiny_model(tmp_path / "model", "llama", vocab=98, layers=2)
    write_char_tokenizer(tmp_path / "model")
    engine = Engine.load(tmp_path / "model", max_seqs=3, max_context=64)
    prompts = [[5] * 70, [6] * 50, [7] * 10]  # longer than the context, near it, short
    records = continue_prompts(engine, prompts, 30, [SamplingParams()] * 3)
    lengths = [len(r.argmax) for r in records]
    # Positions computed: at most the context (64) less the last token, never fed; the
    # short one, its 10 and 29 of its 30 tokens.
    assert lengths == [63, 63, 39]
    assert all(len(r.tokens) == len(r.argmax) + 1 == r.hidden.shape[0] + 1 for r in records)
