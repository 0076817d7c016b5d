"""The OpenAI API's request bodies (pydantic, strict: "5" is no number), and how each
becomes mtpd's generation options or chat request."""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mtpd.daemon.openai_errors import Unsupported
from mtpd.daemon.options import MAX_TOP_LOGPROBS, GenerationOptions, OutputFormat
from mtpd.model.errors import InvalidParameter
from mtpd.v1 import inference_pb2 as api


class _Body(BaseModel):
    # strict: "5" is not a number and 1 is not a boolean, as in OpenAI's own checks.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1)  # choice i draws with seed + i
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # mtpd's own sampling and drafting controls (the openai SDK sends them via extra_body)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    draft_tokens: int | None = None
    ignore_eos: bool = False
    # Structured output: OpenAI's response_format, or vLLM's structured_outputs (json,
    # regex or grammar) via extra_body.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None  # vLLM's older spellings: refused, by name
    guided_regex: Any = None
    guided_grammar: Any = None
    guided_choice: Any = None

    def refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options: only allowed with stream")
        for old in ("guided_json", "guided_regex", "guided_grammar", "guided_choice"):
            if getattr(self, old) is not None:
                raise Unsupported(
                    old, f"{old}: send structured_outputs (json, regex or grammar) instead"
                )

    def output_format(self) -> OutputFormat | None:
        """The constraint response_format or structured_outputs asks for, if any."""
        formats = []
        if self.response_format is not None:
            formats.append(_response_format(self.response_format))
        if self.structured_outputs is not None:
            formats.append(_structured_outputs(self.structured_outputs))
        formats = [f for f in formats if f is not None]
        if len(formats) > 1:
            raise InvalidParameter(
                "structured_outputs: send it or response_format, not both", "structured_outputs"
            )
        return formats[0] if formats else None

    def options(self, max_tokens: int) -> GenerationOptions:
        extras = {
            k: v
            for k in ("top_k", "min_p", "repetition_penalty", "draft_tokens")
            if (v := getattr(self, k)) is not None
        }
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        # No seed: a fresh one, so sampling varies from call to call as with OpenAI.
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        return GenerationOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
            stop=tuple(stop),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=_token_ids(self.logit_bias or {}),
            structured_output=self.output_format(),
            n=self.n,
            **self.logprob_options(),
            **extras,
        )

    def logprob_options(self) -> dict[str, Any]:
        return {}


def _response_format(spec: dict[str, Any]) -> OutputFormat | None:
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json_object", "", "response_format")
    if kind != "json_schema":
        raise InvalidParameter(
            f"response_format: type {kind!r} is not one of text, json_object, json_schema",
            "response_format",
        )
    inner = spec.get("json_schema")
    if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict | bool):
        raise InvalidParameter(
            "response_format: json_schema needs a schema (an object)", "response_format"
        )
    return OutputFormat("json_schema", json.dumps(inner["schema"]), "response_format")


def _structured_outputs(spec: dict[str, Any]) -> OutputFormat:
    kinds = {"json": "json_schema", "regex": "regex", "grammar": "grammar"}
    given = [k for k in spec if spec[k] is not None]
    if len(given) != 1 or given[0] not in kinds:
        raise InvalidParameter(
            f"structured_outputs: one of {', '.join(kinds)} expected, got {given}",
            "structured_outputs",
        )
    key = given[0]
    value = spec[key]
    if key == "json" and not isinstance(value, str):
        value = json.dumps(value)
    if not isinstance(value, str):
        raise InvalidParameter(f"structured_outputs: {key} must be a string", "structured_outputs")
    return OutputFormat(kinds[key], value, "structured_outputs")


def _token_ids(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids as JSON strings."""
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise InvalidParameter(f"logit_bias: key {key!r} is not a token id", "logit_bias")
        out[int(key)] = value
    return out


class TextPart(_Body):
    type: Literal["text"]
    text: str


class CalledFunction(_Body):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends JSON text; some clients an object


class MessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def to_proto(self) -> api.ChatMessage:
        # "developer" is OpenAI's newer name for the system role.
        return api.ChatMessage(
            role="system" if self.role == "developer" else self.role,
            content=self.text(),
            name=self.name or "",
            tool_call_id=self.tool_call_id or "",
            reasoning_content=self.reasoning_content or "",
            tool_calls=[
                api.ToolCall(
                    id=c.id,
                    name=c.function.name,
                    arguments=c.function.arguments
                    if isinstance(c.function.arguments, str)
                    else json.dumps(c.function.arguments, ensure_ascii=False),
                )
                for c in self.tool_calls or []
            ],
        )


class FunctionSpec(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # honoured once constrained decoding lands


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # via extra_body, as vLLM takes it

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.functions:
            raise Unsupported("functions", "functions: deprecated by OpenAI; send tools")

    def logprob_options(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs or 0}

    def to_proto(self) -> api.ChatRequest:
        choice = api.ToolChoice()
        if isinstance(self.tool_choice, NamedToolChoice):
            choice.function = self.tool_choice.function.name
        elif self.tool_choice is not None:
            choice.mode = self.tool_choice
        return api.ChatRequest(
            messages=[m.to_proto() for m in self.messages],
            tools=[
                api.Tool(
                    name=t.function.name,
                    description=t.function.description or "",
                    parameters=""
                    if t.function.parameters is None
                    else json.dumps(t.function.parameters, ensure_ascii=False),
                )
                for t in self.tools or []
            ],
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
            chat_template_kwargs=json.dumps(self.chat_template_kwargs)
            if self.chat_template_kwargs
            else "",
        )


class CompletionRequest(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None  # the legacy API's: this many top tokens' too

    def logprob_options(self) -> dict[str, Any]:
        if self.logprobs is None:
            return {}
        if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameter(
                f"logprobs: must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}", "logprobs"
            )
        return {"logprobs": True, "top_logprobs": self.logprobs}

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise Unsupported("echo", "echo: mtpd does not echo the prompt")
        if self.suffix:
            raise Unsupported("suffix", "suffix: mtpd does not insert text")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", "best_of: mtpd generates one completion")
        several = isinstance(self.prompt, list) and len(self.prompt) > 1
        if several and not isinstance(self.prompt[0], int):
            raise Unsupported("prompt", "prompt: one prompt per request")
