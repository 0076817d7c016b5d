"""What the sync and async clients share: building requests from Python values, and
assembling the streamed chunks into deltas and a result."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import grpc

from mtpd.address import client_address, socket_distrust
from mtpd.client.errors import UntrustedSocket
from mtpd.v1 import inference_pb2 as api

# A chat message: {"role": ..., "content": ...} or (role, content). As in OpenAI's API,
# an assistant message may carry "tool_calls" (each {"id", "function": {"name",
# "arguments"}}, or a ToolCall) and "reasoning_content"; a tool message "tool_call_id".
Message = Mapping[str, Any] | tuple[str, str]

_FINISH = {
    api.FINISH_REASON_STOP: "stop",
    api.FINISH_REASON_LENGTH: "length",
    api.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is a JSON object's text, valid for the tool's
    parameters schema."""

    id: str
    name: str
    arguments: str


class ChatOptions(TypedDict, total=False):
    """What a chat may add to the generation options (see ChatRequest in
    protos/mtpd/v1/inference.proto)."""

    # OpenAI function tools ({"type": "function", "function": {"name", "description",
    # "parameters"}}) or their "function" part alone.
    tools: Sequence[Mapping[str, Any]]
    # "auto", "none", "required", a tool's name, or {"type": "function", "function":
    # {"name": ...}}
    tool_choice: str | Mapping[str, Any]
    parallel_tool_calls: bool
    chat_template_kwargs: Mapping[str, Any]  # e.g. {"enable_thinking": False}


class Options(TypedDict, total=False):
    """Generation options; an absent one takes the server's default (see
    GenerationOptions in protos/mtpd/v1/inference.proto, or `mtpd info`)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int
    stop: str | Sequence[str]
    draft_tokens: int
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[int, float]  # token id: bias
    logprobs: bool  # each token's log-probability (GenerationResult.logprobs)
    top_logprobs: int  # and the top this many tokens' at its position (0..20)
    # Structured output, one of {"json_schema": schema (a dict or JSON text)},
    # {"json_object": True}, {"regex": "..."}, {"grammar": "..."} (llguidance's Lark).
    structured_output: Mapping[str, Any]
    # Choices from the one prompt (GenerationResult.choices), choice i sampling with
    # seed + i.
    n: int


def generation_options(options: Options) -> api.GenerationOptions:
    values = {k: v for k, v in options.items() if v is not None}
    if isinstance(values.get("stop"), str):  # one stop sequence, not one per character
        values["stop"] = [values["stop"]]
    structured = values.get("structured_output")
    if isinstance(structured, Mapping) and "json_schema" in structured:
        values["structured_output"] = {
            **structured,
            "json_schema": _json(structured["json_schema"]),
        }
    try:
        return api.GenerationOptions(**values)
    except ValueError as e:  # an unknown option
        raise TypeError(str(e)) from None


def generate_request(
    prompt: str | Sequence[int], request_id: str | None, options: Options
) -> api.GenerateRequest:
    """A text prompt, or token ids."""
    request = api.GenerateRequest(options=generation_options(options), request_id=request_id or "")
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, bytes | bytearray):
        raise TypeError("the prompt is text (str) or token ids, not bytes")
    else:
        request.prompt_token_ids.extend(prompt)
    return request


class ChatCallOptions(Options, ChatOptions, total=False):
    """A chat call's keyword arguments."""


def _json(value: str | Mapping[str, Any]) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _tool_call(call: ToolCall | Mapping[str, Any]) -> api.ToolCall:
    if isinstance(call, ToolCall):
        return api.ToolCall(id=call.id, name=call.name, arguments=call.arguments)
    function = call.get("function", call)
    return api.ToolCall(
        id=call.get("id", ""),
        name=function.get("name", ""),
        arguments=_json(function.get("arguments", "{}")),
    )


def chat_messages(messages: Sequence[Message]) -> list[api.ChatMessage]:
    out = []
    for m in messages:
        if not isinstance(m, Mapping):
            role, content = m
            out.append(api.ChatMessage(role=role, content=content))
            continue
        out.append(
            api.ChatMessage(
                role=m["role"],
                content=m.get("content") or "",
                tool_calls=[_tool_call(c) for c in m.get("tool_calls") or []],
                tool_call_id=m.get("tool_call_id") or "",
                name=m.get("name") or "",
                reasoning_content=m.get("reasoning_content") or "",
            )
        )
    return out


def _tool(tool: Mapping[str, Any]) -> api.Tool:
    function = tool.get("function", tool)
    parameters = function.get("parameters")
    return api.Tool(
        name=function.get("name", ""),
        description=function.get("description") or "",
        parameters="" if parameters is None else _json(parameters),
    )


def chat_request(
    messages: Sequence[Message],
    request_id: str | None,
    options: Options,
    chat: ChatOptions | None = None,
) -> api.ChatRequest:
    chat = chat or {}
    request = api.ChatRequest(
        messages=chat_messages(messages),
        options=generation_options(options),
        request_id=request_id or "",
        tools=[_tool(t) for t in chat.get("tools") or []],
    )
    choice = chat.get("tool_choice")
    if isinstance(choice, Mapping):
        request.tool_choice.function = choice.get("function", {}).get("name", "")
    elif choice in ("auto", "none", "required"):
        request.tool_choice.mode = choice
    elif choice is not None:
        request.tool_choice.function = choice
    if chat.get("parallel_tool_calls") is not None:
        request.parallel_tool_calls = chat["parallel_tool_calls"]
    if chat.get("chat_template_kwargs"):
        request.chat_template_kwargs = json.dumps(chat["chat_template_kwargs"])
    return request


def split_chat_options(options: dict[str, Any]) -> tuple[Options, ChatOptions]:
    """A chat call's keyword arguments: the generation options and the chat's own."""
    chat = {k: options.pop(k) for k in list(options) if k in ChatOptions.__optional_keys__}
    return options, chat  # type: ignore[return-value]


@dataclass(frozen=True)
class Delta:
    """New text from one step, with the tokens the step accepted (and, when asked, their
    log-probabilities); in a chat also the reasoning's new text and the tool calls
    completed."""

    text: str
    token_ids: list[int]
    accepted_drafts: int  # of token_ids, MTP drafts that verification accepted
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[api.TokenLogprob] = field(default_factory=list)  # one per token_ids
    choice: int = 0  # with Options.n > 1: the choice it belongs to


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # "stop" (end of sequence or a stop sequence), "length" or "tool_calls"
    finish_reason: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[api.TokenLogprob] = field(default_factory=list)  # with Options.logprobs
    stop_sequence: str | None = None
    request_id: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, taken from a cache (prefix caching)
    completion_tokens: int = 0
    accepted_drafts: int = 0
    timing: api.Timing = field(default_factory=api.Timing)
    drafts: api.DraftSummary = field(default_factory=api.DraftSummary)
    # With Options.n > 1: the results of choices 1 .. n-1 (this one is choice 0's).
    others: list[GenerationResult] = field(default_factory=list)

    @property
    def choices(self) -> list[GenerationResult]:
        """Every choice's result, choice 0 first."""
        return [self, *self.others]

    def add(self, chunk: api.GenerateChunk) -> Delta | None:
        """Take one streamed chunk; returns the delta it carries, if any."""
        if chunk.choice:
            while len(self.others) < chunk.choice:
                self.others.append(GenerationResult())
            return self.others[chunk.choice - 1]._add(chunk)
        return self._add(chunk)

    def _add(self, chunk: api.GenerateChunk) -> Delta | None:
        self.text += chunk.text
        self.reasoning += chunk.reasoning_text
        calls = [ToolCall(c.id, c.name, c.arguments) for c in chunk.tool_calls]
        self.tool_calls += calls
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.accepted_drafts += chunk.accepted_drafts
        self.request_id = chunk.request_id
        if chunk.finish_reason:
            self.finish_reason = _FINISH.get(chunk.finish_reason, "unknown")
            self.stop_sequence = chunk.stop_sequence or None
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.cached_tokens = chunk.usage.cached_tokens
            self.completion_tokens = chunk.usage.completion_tokens
            self.timing, self.drafts = chunk.timing, chunk.drafts
        if chunk.text or chunk.token_ids or chunk.reasoning_text or calls:
            return Delta(
                chunk.text,
                list(chunk.token_ids),
                chunk.accepted_drafts,
                chunk.reasoning_text,
                calls,
                list(chunk.logprobs),
                chunk.choice,
            )
        return None

    @property
    def done(self) -> bool:
        """Every choice has ended."""
        return all(bool(c.finish_reason) for c in self.choices)


TOKEN_ENV = "MTPD_API_TOKEN"


TLS_CA_ENV = "MTPD_TLS_CA"


class CallSettings:
    """What both clients hold: the address, the default deadline, the token, and the
    TLS credentials for a TCP address (None: plaintext)."""

    def __init__(
        self,
        address: str | None,
        token: str | None,
        timeout: float | None,
        tls_ca: str | None,
    ) -> None:
        self.address = client_address(address)
        if self.address.startswith("unix:"):  # before any token or prompt is sent
            why = socket_distrust(Path(self.address.removeprefix("unix:")))
            if why is not None:
                raise UntrustedSocket(f"refusing to connect: {why}")
        self.timeout = timeout
        token = token or os.environ.get(TOKEN_ENV)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._tls: grpc.ChannelCredentials | None = None
        ca = tls_ca or os.environ.get(TLS_CA_ENV)
        if ca and not self.address.startswith("unix:"):
            self._tls = grpc.ssl_channel_credentials(Path(ca).read_bytes())

    def _call(self, timeout: float | None) -> dict:
        """Keyword arguments of a stub call."""
        return {"timeout": timeout or self.timeout, "metadata": self._metadata}
