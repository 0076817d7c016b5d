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

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtpd.daemon.strict_json import loads_json
from mtpd.model.errors import InvalidParameter

if TYPE_CHECKING:
    import llguidance

    from mtpd.model.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "grammar")
MAX_SPEC_BYTES = 1 << 17  # of a schema, regex or grammar
# JSON as Python's json.dumps and the chat templates' tojson write it (", " and ": "),
# with no other whitespace: free whitespace lets a model pad a reply without end.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


@dataclass(frozen=True)
class OutputFormat:
    """A request's constraint as its caller wrote it: `kind` one of KINDS, `text` the
    schema (JSON), the regex or the grammar, `param` the caller's name for it (errors
    name it)."""

    kind: str
    text: str = ""
    param: str = "structured_output"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidParameter(
                f"{self.param}: {self.kind!r} is not one of {', '.join(KINDS)}", self.param
            )
        size = len(self.text.encode("utf-8", "surrogatepass"))
        if size > MAX_SPEC_BYTES:
            raise InvalidParameter(
                f"{self.param}: {size} bytes, above the {MAX_SPEC_BYTES} a constraint may have",
                self.param,
            )
        if self.kind != "json_object" and not self.text.strip():
            raise InvalidParameter(f"{self.param}: the {self.kind} is empty", self.param)
        if self.kind == "json_schema":
            try:
                schema = loads_json(self.text)
            except ValueError as e:
                raise InvalidParameter(
                    f"{self.param}: the schema is not JSON: {e}", self.param
                ) from e
            if not isinstance(schema, dict | bool):
                raise InvalidParameter(
                    f"{self.param}: a schema is a JSON object, got {type(schema).__name__}",
                    self.param,
                )

    def grammar(self) -> str:
        """llguidance's grammar for it (checked when a matcher is made of it)."""
        import llguidance  # here: its import takes ~60 ms, which every start would pay

        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.text)
        if self.kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(self.text)
        schema = self.text if self.kind == "json_schema" else '{"type": "object"}'
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


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
            "x-guidance": JSON_OPTIONS,
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
    tokenizer lacks, and control tokens, are special: no grammar produces them)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.tokens = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        known = tokenizer.vocab_size
        self.special_token_ids = sorted({*tokenizer.control_ids, *range(known, vocab_size)})
        self.eos_token_id = min(tokenizer.eos_ids, default=0)
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", "replace"))


class Grammars:
    """Makes matchers for one model's vocabulary. llguidance's view of the vocabulary
    takes ~0.3 s to build at 49k tokens: built on the first constrained request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._vocab: llguidance.LLTokenizer | None = None

    def _vocabulary(self) -> llguidance.LLTokenizer:
        import llguidance

        with self._lock:
            if self._vocab is None:
                table = _TokenTable(self._tokenizer, self.vocab_size)
                self._vocab = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(table),
                    n_vocab=self.vocab_size,
                    eos_token=sorted(self._tokenizer.eos_ids) or None,
                )
            return self._vocab

    def matcher(self, output_format: OutputFormat) -> Constraint:
        """A fresh matcher of the format; an InvalidParameter naming its parameter when
        it does not compile. Compiling may take up to a second: call it off the event
        loop."""
        import llguidance

        param = output_format.param
        try:
            grammar = output_format.grammar()
        except ValueError as e:
            raise InvalidParameter(f"{param}: {_short(str(e))}", param) from e
        matcher = llguidance.LLMatcher(self._vocabulary(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidParameter(f"{param}: {_short(matcher.get_error())}", param)
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's matcher. Only the scheduler's thread uses it once submitted."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._mask_bytes = (vocab_size + 31) // 32 * 4

    def allowed_drafts(self, drafts: Sequence[int]) -> int:
        """How many of the drafts, from the first, the grammar allows."""
        return self._matcher.validate_tokens(list(drafts)) if drafts else 0

    def masks(self, drafts: Sequence[int]) -> bytes:
        """The allowed tokens after the tokens consumed, then after each draft (which the
        grammar must allow): len(drafts) + 1 rows of (vocab_size + 31) // 32
        little-endian uint32 words, bit t % 32 of word t // 32 allowing token t."""
        rows = [self._mask()]
        for token in drafts:
            self._matcher.consume_token(token)
            rows.append(self._mask())
        if drafts:
            self._matcher.rollback(len(drafts))
        return b"".join(rows)

    def _mask(self) -> bytes:
        return self._matcher.compute_bitmask()[: self._mask_bytes]

    def consume(self, tokens: Sequence[int]) -> str | None:
        """Take a step's accepted tokens; why they break the grammar, if they do (the
        tail drew them under its masks, so that would be a bug)."""
        if tokens and not self._matcher.consume_tokens(list(tokens)):
            return _short(self._matcher.get_error()) or "a token outside the grammar"
        return None

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more but an end-of-sequence token."""
        return self._matcher.is_stopped()


def _short(message: str, limit: int = 400) -> str:
    return message if len(message) <= limit else message[:limit] + "..."
