"""A request's generation options: their defaults (the one table the CLI, the SDK and
gRPC share; protos/mtpd/v1/inference.proto documents it field by field) and their
validation, with errors that name the field.

Torch-free at import, so the CLI can build its help from the defaults instantly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, or what fits the context
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    draft_tokens: int | None = None  # None: the server's draft policy
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    structured_output: OutputFormat | None = None
    n: int = 1  # choices (daemon/choices.py)

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
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
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
