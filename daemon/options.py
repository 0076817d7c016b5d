"""A request's generation options: their defaults (the one table the CLI, the SDK and
gRPC share; protos/mtpd/v1/inference.proto documents it field by field) and their
validation, with errors that name the field.

Torch-free at import, so the CLI can build its help from the defaults instantly."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mtpd.daemon.strict_json import loads_json
from mtpd.model.errors import InvalidParameter, check_unicode
from mtpd.model.sampling_params import MAX_INT32, SamplingParams
from mtpd.v1 import inference_pb2 as api

DEFAULT_MAX_TOKENS = 128
MAX_STOP_SEQUENCES = 16
MAX_STOP_BYTES = 256
MAX_DRAFT_TOKENS = 16  # the workers' bound (mtpd.worker.stage.MAX_DRAFT_TOKENS)
MAX_REQUEST_ID = 128
MAX_TOP_LOGPROBS = 20  # the workers' bound (mtpd.worker.stage.MAX_TOP_LOGPROBS), OpenAI's
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # mtpd serve --max-request-bytes
TOOL_FORMATS = ("hermes", "xml")  # the tool-call formats daemon/assistant_output.py reads
TOOL_CALL_PARSERS = ("auto", *TOOL_FORMATS, "none")  # mtpd serve --tool-call-parser
REASONING_PARSERS = ("auto", "none")  # mtpd serve --reasoning-parser
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "grammar")
MAX_SPEC_BYTES = 1 << 17  # of a structured output's schema, regex or grammar


@dataclass(frozen=True)
class OutputFormat:
    """A request's structured output as its caller wrote it: `kind` one of
    STRUCTURED_KINDS, `text` the schema (JSON), the regex or the grammar, `param` the
    caller's name for it (errors name it). Compiled by daemon/structured_output.py."""

    kind: str
    text: str = ""
    param: str = "structured_output"

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidParameter(
                f"{self.param}: {self.kind!r} is not one of {', '.join(STRUCTURED_KINDS)}",
                self.param,
            )
        check_unicode(self.text, self.param)
        size = len(self.text.encode())
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
            if schema is False:
                raise InvalidParameter(f"{self.param}: the schema false admits nothing", self.param)
            if not isinstance(schema, dict | bool):
                raise InvalidParameter(
                    f"{self.param}: a schema is a JSON object, got {type(schema).__name__}",
                    self.param,
                )


def parse_draft_tokens(text: str) -> int | None:
    """A number of drafts per step, or auto (None: the server's policy)."""
    if text == "auto":
        return None
    try:
        k = int(text)
    except ValueError:
        raise InvalidParameter(f"{text!r}: a number of drafts or auto", "draft_tokens") from None
    if not 0 <= k <= MAX_DRAFT_TOKENS:
        raise InvalidParameter(f"must be in 0..{MAX_DRAFT_TOKENS} or auto, got {k}", "draft_tokens")
    return k


def parse_logit_bias(text: str) -> dict[int, float]:
    """Token ids' biases as a JSON object."""
    try:
        bias = json.loads(text)
        return {int(k): float(v) for k, v in bias.items()}
    except (ValueError, AttributeError, TypeError):
        raise InvalidParameter(
            f"{text!r} is not a JSON object of token ids and biases", "logit_bias"
        ) from None


def option(default: Any, help: str, **flag: Any) -> Any:
    """A generation option of the table below: its default, and its command-line flag's
    help ("{default}" names the default) and argparse settings beyond the type, which is
    the field's (`parse` reads a value that is not a plain int, float or string)."""
    metadata = {"flag": {"help": help, **flag}}
    if isinstance(default, dict):  # a fresh one each time
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class GenerationOptions:
    """The one table of a request's options. The gRPC message (GenerationOptions in
    protos/mtpd/v1/inference.proto), the SDK's `Options`, the CLI's flags, the OpenAI
    bodies and the workers' SamplingParams each follow it; tests/test_option_table.py
    fails when one drifts."""

    max_tokens: int | None = option(
        None, f"tokens to generate at most (default {DEFAULT_MAX_TOKENS}, or what fits the context)"
    )
    temperature: float = option(0.0, "0 means greedy (default {default})")
    top_p: float = option(1.0, "nucleus sampling (default {default}: off)")
    top_k: int = option(0, "0 turns top-k off (default {default})")
    min_p: float = option(0.0, "(default {default}: off)")
    repetition_penalty: float = option(1.0, "(default {default})")
    seed: int = option(0, "seed of the sampler (default {default})")
    stop: tuple[str, ...] = option(
        (), "a stop sequence: generation ends before it (repeat for several)", action="append"
    )
    draft_tokens: int | None = option(  # None: the server's draft policy
        None,
        "MTP drafts per step: a number (0 turns MTP off) or auto (the default: chosen per "
        "sequence from measured acceptance and costs)",
        parse=parse_draft_tokens,
        metavar="K|auto",
    )
    ignore_eos: bool = option(False, "generate past the end of sequence", action="store_true")
    presence_penalty: float = option(0.0, "[-2, 2] (default {default}: off)")
    frequency_penalty: float = option(0.0, "[-2, 2] (default {default}: off)")
    logit_bias: Mapping[int, float] = option(
        {},
        "token ids' biases as JSON, e.g. '{{\"13\": -100}}' (bans token 13)",
        parse=parse_logit_bias,
    )
    logprobs: bool = option(
        False, "return each token's log-probability (in --json)", action="store_true"
    )
    top_logprobs: int = option(0, f"and the top N tokens' at its position (0..{MAX_TOP_LOGPROBS})")
    # Its flags are four, one per kind (mtpd.cli_flags.add_generation_flags).
    structured_output: OutputFormat | None = None
    n: int = option(  # choices (daemon/choices.py)
        1,
        "choices from the prompt, choice i sampling with seed + i (default {default})",
        short="-n",
    )

    def __post_init__(self) -> None:
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_INT32:
            raise InvalidParameter(
                f"max_tokens must be in 1..{MAX_INT32}, got {self.max_tokens}", "max_tokens"
            )
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidParameter(
                f"stop: at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}", "stop"
            )
        for i, s in enumerate(self.stop):
            check_unicode(s, f"stop[{i}]")
            size = len(s.encode())
            if not 1 <= size <= MAX_STOP_BYTES:
                raise InvalidParameter(
                    f"stop[{i}]: a stop sequence must be 1 to {MAX_STOP_BYTES} bytes, got {size}",
                    f"stop[{i}]",
                )
        if self.draft_tokens is not None and not 0 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidParameter(
                f"draft_tokens must be in 0..{MAX_DRAFT_TOKENS}, got {self.draft_tokens}",
                "draft_tokens",
            )
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameter(
                f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}",
                "top_logprobs",
            )
        if not 1 <= self.n <= MAX_INT32:
            raise InvalidParameter(f"n must be in 1..{MAX_INT32}, got {self.n}", "n")
        if self.top_logprobs and not self.logprobs:
            raise InvalidParameter("top_logprobs: set logprobs too", "top_logprobs")
        # Sampling fields (and the seed) are checked where they are defined.
        self.sampling()

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingParams)}
        )

    def max_tokens_for(self, prompt_tokens: int, context: int) -> int:
        """An absent max_tokens means the default, shortened to what fits the context; an
        explicit one that does not fit is the caller's error (the scheduler says so)."""
        if self.max_tokens is not None:
            return self.max_tokens
        return max(1, min(DEFAULT_MAX_TOKENS, context - prompt_tokens))

    @classmethod
    def from_proto(cls, msg: api.GenerationOptions) -> GenerationOptions:
        fields = {
            f.name: getattr(msg, f.name)
            for f in dataclasses.fields(cls)
            if f.name not in _REPEATED and msg.HasField(f.name)
        }
        kind = msg.structured_output.WhichOneof("format")
        if kind == "json_object" and not msg.structured_output.json_object:
            kind = None  # json_object false: no constraint
        return cls(
            **fields,
            stop=tuple(msg.stop),
            ignore_eos=msg.ignore_eos,
            logit_bias=dict(msg.logit_bias),
            logprobs=msg.logprobs,
            structured_output=None
            if kind is None
            else OutputFormat(
                kind,
                "" if kind == "json_object" else getattr(msg.structured_output, kind),
                "structured_output",
            ),
        )

    def to_proto(self) -> api.GenerationOptions:
        msg = api.GenerationOptions(
            stop=list(self.stop),
            ignore_eos=self.ignore_eos,
            logit_bias=self.logit_bias,
            logprobs=self.logprobs,
        )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in _REPEATED and value is not None:
                setattr(msg, f.name, value)
        if self.structured_output is not None:
            kind = self.structured_output.kind
            value = True if kind == "json_object" else self.structured_output.text
            setattr(msg.structured_output, kind, value)
        return msg


# The fields without presence on the wire (proto3 repeated, map and plain bool), and
# messages.
_REPEATED = ("stop", "ignore_eos", "logit_bias", "logprobs", "structured_output")


def flagged_options() -> list[dataclasses.Field]:
    """The options with a flag of their own, in the table's order."""
    return [f for f in dataclasses.fields(GenerationOptions) if "flag" in f.metadata]


def defaults_proto() -> api.GenerationOptions:
    """Every option with its default set (draft_tokens stays absent: the policy's)."""
    return dataclasses.replace(GenerationOptions(), max_tokens=DEFAULT_MAX_TOKENS).to_proto()


def check_prompt_ids(ids: list[int], vocab_size: int, field: str) -> None:
    """Every id a token of the vocabulary (an API's `field`: prompt_token_ids, prompt)."""
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidParameter(
            f"{field}[{bad}]: {ids[bad]} is not a token id (the vocabulary is 0..{vocab_size - 1})",
            field,
        )
