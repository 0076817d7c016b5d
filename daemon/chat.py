"""A chat request on its way in and its reply on the way out, the same for gRPC and the
OpenAI API: messages, tools and template keywords checked once at the front (errors
name the field), rendered by the model's chat template, and the reply split into its
content, its reasoning and its tool calls (daemon/assistant_output.py).

Choices where OpenAI's API leaves them open, as vLLM makes them: an assistant message's
call arguments reach the template as an object, not as JSON text (templates that loop
over them need one), and its absent content as "" (OpenAI's SDK sends null there, on
which Qwen3's template fails); `tool_choice: "none"` shows the template no tools; a named
function shows it that tool alone; the reply's format is read off the template
(`--tool-call-parser auto`), and reasoning is split off where the template knows
`<think>` (`--reasoning-parser auto`)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from mtpd.daemon.assistant_output import (
    TOOL_FORMATS,
    AssistantOutput,
    opens_reasoning,
    thinks,
    tool_format_of,
)
from mtpd.daemon.coordinator import Coordinator
from mtpd.daemon.generation import Prompt
from mtpd.model.errors import InvalidParameter
from mtpd.model.tokenizer import ROLES, Tokenizer
from mtpd.v1 import inference_pb2 as api

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_CALL_PARSERS = ("auto", *TOOL_FORMATS, "none")  # mtpd serve --tool-call-parser
REASONING_PARSERS = ("auto", "none")  # mtpd serve --reasoning-parser
TOOL_CHOICES = ("auto", "none", "required")
# What the template is given by mtpd itself: a caller's keywords may not replace them.
RESERVED_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"}
)


@dataclass(frozen=True)
class Chat:
    """A checked chat request, as the template and the reply's reader take it."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]  # OpenAI function tools, as the template sees them
    shown: list[dict[str, Any]]  # those the template shows (tool_choice picks them)
    parallel_tool_calls: bool
    template_kwargs: dict[str, Any]

    @classmethod
    def from_proto(cls, request: api.ChatRequest) -> Chat:
        if not request.messages:
            raise InvalidParameter("messages: at least one message is needed", "messages")
        tools = _tools(request.tools)
        names = {t["function"]["name"] for t in tools}
        choice = request.tool_choice
        if choice.WhichOneof("choice") == "function":
            if choice.function not in names:
                raise InvalidParameter(
                    f"tool_choice: {choice.function!r} names no tool of this request",
                    "tool_choice",
                )
            shown = [t for t in tools if t["function"]["name"] == choice.function]
        else:
            mode = choice.mode or "auto"
            if mode not in TOOL_CHOICES:
                raise InvalidParameter(
                    f"tool_choice: {mode!r} is not one of {', '.join(TOOL_CHOICES)}",
                    "tool_choice",
                )
            if mode == "required" and not tools:
                raise InvalidParameter("tool_choice: 'required' needs tools", "tool_choice")
            shown = [] if mode == "none" else tools
        parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
        return cls(
            _messages(request.messages),
            tools,
            shown,
            parallel,
            _template_kwargs(request.chat_template_kwargs),
        )

    def encode(self, tokenizer: Tokenizer) -> tuple[str, list[int]]:
        """The rendered prompt with the generation prompt added, and its token ids."""
        if self.shown and tokenizer.templates is not None:
            _, source = tokenizer.templates.source(True)
            if "tools" not in source:  # the model would never see them
                raise InvalidParameter(
                    "tools: this model's chat template does not show tools to the model",
                    "tools",
                )
        _refuse_markup(tokenizer, self.shown, self.messages)
        return tokenizer.encode_chat(
            self.messages, tools=self.shown or None, template_kwargs=self.template_kwargs
        )

    def reply_reader(
        self, tokenizer: Tokenizer, prompt: str, tool_call_parser: str, reasoning_parser: str
    ) -> AssistantOutput:
        """What splits the reply: the format the template teaches (or the one asked for),
        and reasoning where the template knows `<think>`."""
        assert tokenizer.templates is not None  # encode() rendered with it
        _, source = tokenizer.templates.source(bool(self.shown))  # as encode() renders
        tool_format = tool_format_of(source) if tool_call_parser == "auto" else tool_call_parser
        reasoning = reasoning_parser == "auto" and thinks(source)
        return AssistantOutput(
            self.shown,
            None if tool_format == "none" else tool_format,
            reasoning,
            in_reasoning=reasoning and opens_reasoning(prompt),
            parallel_tool_calls=self.parallel_tool_calls,
        )


def _json_object(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidParameter(f"{param}: not valid JSON ({e})", param) from None
    if not isinstance(value, dict):
        raise InvalidParameter(f"{param}: must be a JSON object", param)
    return value


def _tools(tools: Sequence[api.Tool]) -> list[dict[str, Any]]:
    if len(tools) > MAX_TOOLS:
        raise InvalidParameter(f"tools: at most {MAX_TOOLS}, got {len(tools)}", "tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        param = f"tools[{i}].function"
        if not TOOL_NAME.fullmatch(tool.name):
            raise InvalidParameter(
                f"{param}.name: 1 to 64 letters, digits, '_' or '-', got {tool.name!r}",
                f"{param}.name",
            )
        if tool.name in seen:
            raise InvalidParameter(f"{param}.name: {tool.name!r} twice", f"{param}.name")
        seen.add(tool.name)
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters:
            schema = _json_object(tool.parameters, f"{param}.parameters")
            try:
                validator_for(schema).check_schema(schema)
            except SchemaError as e:
                raise InvalidParameter(
                    f"{param}.parameters: not a valid JSON schema: {e.message}",
                    f"{param}.parameters",
                ) from None
            function["parameters"] = schema
        out.append({"type": "function", "function": function})
    return out


def _messages(messages: Sequence[api.ChatMessage]) -> list[dict[str, Any]]:
    out, calls = [], set()
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if m.role not in ROLES:
            raise InvalidParameter(
                f"{param}.role: unknown role {m.role!r} (expected one of {', '.join(ROLES)})",
                f"{param}.role",
            )
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidParameter(
                    f"{param}.tool_calls: only assistant messages make calls", f"{param}.tool_calls"
                )
            message["tool_calls"] = [
                _call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(m.tool_calls)
            ]
            calls.update(c.id for c in m.tool_calls)
        if m.role == "tool":
            if m.tool_call_id not in calls:
                raise InvalidParameter(
                    f"{param}.tool_call_id: {m.tool_call_id!r} answers no call of an earlier "
                    "assistant message",
                    f"{param}.tool_call_id",
                )
            message["tool_call_id"] = m.tool_call_id
        elif m.tool_call_id:
            raise InvalidParameter(
                f"{param}.tool_call_id: only tool messages answer calls", f"{param}.tool_call_id"
            )
        if m.name:
            message["name"] = m.name
        if m.reasoning_content:
            message["reasoning_content"] = m.reasoning_content
        out.append(message)
    return out


def _call(call: api.ToolCall, param: str) -> dict[str, Any]:
    if not call.id:
        raise InvalidParameter(f"{param}.id: a call needs an id", f"{param}.id")
    if not call.name:
        raise InvalidParameter(
            f"{param}.function.name: a call needs a name", f"{param}.function.name"
        )
    arguments = _json_object(call.arguments or "{}", f"{param}.function.arguments")
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def _template_kwargs(text: str) -> dict[str, Any]:
    if not text:
        return {}
    kwargs = _json_object(text, "chat_template_kwargs")
    reserved = sorted(RESERVED_VARIABLES & set(kwargs))
    if reserved:
        raise InvalidParameter(
            f"chat_template_kwargs: {', '.join(reserved)} cannot be set (mtpd gives them)",
            "chat_template_kwargs",
        )
    return kwargs


def _refuse_markup(
    tokenizer: Tokenizer, tools: list[dict[str, Any]], messages: list[dict[str, Any]]
) -> None:
    """Tools and calls are rendered as JSON, where the tokenizer's guard against markup in
    a message's content cannot reach: a control token spelled there is refused instead."""
    fields = [(f"tools[{i}]", json.dumps(t, ensure_ascii=False)) for i, t in enumerate(tools)]
    fields += [
        (f"messages[{i}].{key}", json.dumps(m[key], ensure_ascii=False))
        for i, m in enumerate(messages)
        for key in ("tool_calls", "name", "tool_call_id")
        if key in m
    ]
    for param, text in fields:
        markup = tokenizer.markup_in(text)
        if markup is not None:
            raise InvalidParameter(f"{param}: contains the model's control token {markup!r}", param)


def chat_prompt(daemon: Coordinator, request: api.ChatRequest) -> Prompt:
    """A chat request checked and rendered, with the reader of its reply."""
    chat = Chat.from_proto(request)
    text, ids = chat.encode(daemon.tokenizer)
    reader = chat.reply_reader(
        daemon.tokenizer, text, daemon.tool_call_parser, daemon.reasoning_parser
    )
    return Prompt(ids, reader)
