"""Streaming text: stop sequences found across steps and never streamed in part, and
a decoder window that stays short whatever the tokens."""

from __future__ import annotations

import pytest
import tokenizers
from tiny_models import write_char_tokenizer

from mtpd.daemon.generation import StopMatcher
from mtpd.model.tokenizer import IncrementalDecoder, Tokenizer


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = []
    for piece in pieces:
        text, stop = matcher.feed(piece)
        out.append(text)
        if stop is not None:
            return "".join(out), stop
    return "".join(out) + matcher.flush(), None


@pytest.mark.parametrize(
    ("pieces", "stops", "want"),
    [
        (["Hello wor", "ld. Bye"], ["world"], ("Hello ", "world")),
        (["ab", "c", "d"], ["abd", "cd"], ("ab", "cd")),  # the earliest stop wins
        (["a<", "/", "x>b"], ["</s>"], ("a</x>b", None)),  # held back, then released
        (["x", "END", "x"], ["END", "ENDX"], ("x", "END")),
        (["no stop here"], [], ("no stop here", None)),
    ],
)
def test_stop_matcher(pieces, stops, want):
    assert feed_all(StopMatcher(stops), pieces) == want


def test_held_text_is_never_streamed_before_it_is_known(tmp_path):
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", None)  # "ST" might begin "STOP"
    assert matcher.feed("OP") == ("", "STOP")


@pytest.fixture
def tokenizer(tmp_path) -> Tokenizer:
    write_char_tokenizer(tmp_path)
    return Tokenizer(tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), None, 1, [2])


def test_tokens_without_text_keep_the_decoder_window_short(tokenizer):
    decoded = 0
    decode = tokenizer.decode

    def counting(ids):
        nonlocal decoded
        decoded += len(ids)
        return decode(ids)

    tokenizer.decode = counting
    decoder = IncrementalDecoder(tokenizer)
    a = tokenizer.encode("a")
    pieces = [decoder.push(a)] + [decoder.push([2]) for _ in range(2000)] + [decoder.push(a)]
    assert "".join(pieces) == "aa"
    assert decoded < 100 * 2000  # linear: a growing window would decode ~2000² ids


def test_token_bytes_put_back_what_was_encoded_pieces_of_characters_included():
    """A token's bytes (what logprobs report): for a byte-level BPE (the default model's)
    and a sentencepiece-style one with byte fallback, joined they are the text's UTF-8,
    also where a token holds only part of a character."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from mtpd.model.checkpoint import open_checkpoint, read_config
    from mtpd.model.default_model import default_model_path

    ckpt = open_checkpoint(default_model_path())
    smollm2 = Tokenizer.from_checkpoint(ckpt, read_config(ckpt))
    text = "café 日本 ok <|im_start|> and more"
    ids = smollm2.encode(text)
    pieces = [smollm2.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(not p.decode(errors="ignore") for p in pieces)  # a piece of a character

    raw = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *bytes_alphabet])
    raw.train_from_iterator(["some text to learn from", "more text"] * 5, trainer)
    spm = Tokenizer(raw, None, None, [])
    ids = spm.encode("text é")
    assert b"".join(spm.token_bytes(i) for i in ids).lstrip() == "text é".encode()
