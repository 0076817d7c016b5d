"""Structured output: what constrains a request's tokens (a JSON schema, any JSON object,
a regular expression, a Lark grammar, a forced tool call), compiled by llguidance, and
the matcher that follows one request's tokens.

The matcher lives with the request in the daemon (docs/structured-output.md). Before a
step is sent, drafts the grammar forbids are cut off (they could only be rejected), and
the step carries one mask of allowed tokens for each position the tail samples: after
the last accepted token, and after each draft. The tail applies row j's mask before it
draws position j's token, so verification draws exactly what plain decoding under the
grammar would; the matcher then consumes the tokens the step accepted.

llguidance rather than xgrammar: its wheel needs nothing else (xgrammar's pulls torch,
transformers and triton into a daemon that imports no torch), and a mask over a 49k
vocabulary takes it ~30 us on these CPUs.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mtpd.daemon.options import OutputFormat
from mtpd.daemon.strict_json import loads_json
from mtpd.model.errors import InputError, InvalidParameter

if TYPE_CHECKING:
    import llguidance

    from mtpd.model.tokenizer import Tokenizer

# JSON as Python's json.dumps and the chat templates' tojson write it (", " and ": "),
# with no other whitespace: free whitespace lets a model pad a reply without end.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def tool_call_grammar(tools: Sequence[dict[str, Any]], parallel: bool) -> str:
    """A Lark grammar of Hermes tool calls (`<tool_call>\\n{"name": ..., "arguments":
    ...}\\n</tool_call>`) to the given OpenAI tools, their arguments valid against their
    schemas: what tool_choice 'required' or a named function enforces. One call, or with
    parallel calls one or more, newline-separated as the templates show them."""
    bodies = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": tool["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
            # Keywords llguidance does not enforce are let through: the call's arguments
            # are validated against the schema after anyway (AssistantOutput).
            "x-guidance": {**JSON_OPTIONS, "lenient": True},
        }
        for tool in tools
    ]
    return "\n".join(
        [
            'start: call ("\\n" call)*' if parallel else "start: call",
            'call: "<tool_call>\\n" body "\\n</tool_call>"',
            "body: " + " | ".join(f"body{i}" for i in range(len(bodies))),
            *(f"body{i}: %json {json.dumps(body)}" for i, body in enumerate(bodies)),
        ]
    )


class _TokenTable:
    """The vocabulary as llguidance's TokenizerWrapper reads it: each id's bytes (ids the
    tokenizer lacks, and control tokens, are special: only a grammar that names them
    produces them, and the masks leave them out anyway)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.tokens = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.special_token_ids = sorted(_control_ids(tokenizer, vocab_size))
        self.eos_token_id = min(tokenizer.eos_ids)
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode_as_text(text.decode("utf-8", "replace"))


def _control_ids(tokenizer: Tokenizer, vocab_size: int) -> set[int]:
    return {*tokenizer.control_ids, *range(tokenizer.vocab_size, vocab_size)}


# Bounds on the work of one mask (llguidance's defaults allow ~1 s on a regex such as
# (a{1000}){1000}; these, ~70 ms for the first mask, computed while compiling, and a
# few ms for each later one, under the scheduler's lock).
_LIMITS = {"initial_lexer_fuel": 200_000, "step_lexer_fuel": 50_000, "max_lexer_states": 50_000}


class Grammars:
    """Makes matchers for one model's vocabulary. llguidance's view of the vocabulary
    takes ~0.3 s to build at 49k tokens: built on the first constrained request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._vocab: llguidance.LLTokenizer | None = None
        self._text_tokens: np.ndarray | None = None

    def _vocabulary(self) -> tuple[llguidance.LLTokenizer, np.ndarray]:
        import llguidance

        with self._lock:
            if self._vocab is None:
                tokenizer = self._tokenizer
                table = _TokenTable(tokenizer, self.vocab_size)
                self._vocab = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(table),
                    n_vocab=self.vocab_size,
                    eos_token=sorted(tokenizer.eos_ids),
                )
                # What a reply may hold: text tokens, and the end of sequence.
                allowed = np.ones(_mask_words(self.vocab_size) * 32, dtype=bool)
                allowed[self.vocab_size :] = False
                allowed[list(_control_ids(tokenizer, self.vocab_size) - tokenizer.eos_ids)] = False
                self._text_tokens = np.packbits(allowed, bitorder="little")
            assert self._text_tokens is not None
            return self._vocab, self._text_tokens

    def matcher(self, output_format: OutputFormat) -> Constraint:
        """A fresh matcher of the format, its first mask computed; an InvalidParameter
        naming its parameter when it does not compile or allows nothing. Compiling may
        take up to a second: call it off the event loop."""
        import llguidance

        param = output_format.param
        if not self._tokenizer.eos_ids:
            raise InvalidParameter(
                f"{param}: structured output needs the model's end-of-sequence token, and "
                "its tokenizer names none",
                param,
            )
        try:
            grammar = _grammar(output_format)
        except ValueError as e:
            raise InvalidParameter(f"{param}: {_short(str(e))}", param) from e
        vocabulary, text_tokens = self._vocabulary()
        limits = llguidance.LLParserLimits(**_LIMITS, verbose_errors=False)
        matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0, limits=limits)
        constraint = Constraint(matcher, text_tokens)
        try:  # here, off the scheduler's lock: the first mask builds the lexer's states
            constraint.masks([])
        except ConstraintBroken as e:
            raise InvalidParameter(f"{param}: {e}", param) from e
        return constraint


class ConstraintBroken(InputError):
    """The request's grammar failed mid-generation (a resource limit, a token it forbids),
    or allows no token a reply may hold."""


class Constraint:
    """One request's matcher. Only the scheduler's thread uses it once submitted.
    Every failure of llguidance's (an error state, even a panic) is a ConstraintBroken."""

    def __init__(self, matcher: llguidance.LLMatcher, text_tokens: np.ndarray) -> None:
        self._matcher = matcher
        self._text_tokens = text_tokens  # packed like a mask: the tokens a reply may hold

    def allowed_drafts(self, drafts: Sequence[int]) -> int:
        """How many of the drafts, from the first, the grammar allows."""
        if not drafts:
            return 0
        with self._failures():
            return self._matcher.validate_tokens(list(drafts))

    def masks(self, drafts: Sequence[int]) -> bytes:
        """The allowed tokens after the tokens consumed, then after each draft (which the
        grammar must allow): len(drafts) + 1 rows of (vocab_size + 31) // 32
        little-endian uint32 words, bit t % 32 of word t // 32 allowing token t."""
        with self._failures():
            rows = [self._mask()]
            for token in drafts:
                self._matcher.consume_token(token)
                rows.append(self._mask())
            if drafts:
                self._matcher.rollback(len(drafts))
            return b"".join(rows)

    def _mask(self) -> bytes:
        mask = self._matcher.compute_bitmask()
        self._check()
        row = np.frombuffer(mask, dtype=np.uint8)[: len(self._text_tokens)] & self._text_tokens
        if not row.any():
            raise ConstraintBroken("the grammar allows only control tokens here")
        return row.tobytes()

    def consume(self, tokens: Sequence[int]) -> None:
        """Take a step's accepted tokens."""
        if tokens:
            with self._failures():
                self._matcher.consume_tokens(list(tokens))
                self._check()

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more but an end-of-sequence token."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def _check(self) -> None:
        if self._matcher.is_error():
            error = self._matcher.get_error().replace("<non-verbose/>", "").strip()
            if error.startswith("NoExtension"):  # llguidance's name for a dead end
                error = "no text can continue the reply here: the format admits none"
            raise ConstraintBroken(_short(error))

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        try:
            yield
        except ConstraintBroken:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # pyo3 panics are BaseExceptions
            raise ConstraintBroken(f"the grammar engine failed: {_short(str(e))}") from e


def _grammar(output_format: OutputFormat) -> str:
    """llguidance's grammar for a format (checked when a matcher is made of it)."""
    import llguidance  # here: its import takes ~60 ms, which every start would pay

    kind, text = output_format.kind, output_format.text
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(text)
    schema = loads_json(text) if kind == "json_schema" else {"type": "object"}
    if schema is True:  # any JSON value
        schema = {}
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def _mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _short(message: str, limit: int = 400) -> str:
    return message if len(message) <= limit else message[:limit] + "..."
