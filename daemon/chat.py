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

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mtpd.daemon.assistant_output import (
    CLOSE_REASONING,
    AssistantOutput,
    opens_reasoning,
    thinks,
    tool_format_of,
)
from mtpd.daemon.coordinator import Coordinator
from mtpd.daemon.generation import Prompt
from mtpd.daemon.options import OutputFormat
from mtpd.daemon.strict_json import loads_json
from mtpd.daemon.structured_output import tool_call_grammar
from mtpd.daemon.tool_schemas import ToolSchema, tool_schema
from mtpd.model.errors import InvalidParameter
from mtpd.model.tokenizer import ROLES, Tokenizer
from mtpd.v1 import inference_pb2 as api

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_CHOICES = ("auto", "none", "required")
# What mtpd gives the template itself, and the globals of its environment: a caller's
# keywords may not replace them. Llama 3.1's `custom_tools` would show tools past their
# checks (and its calls are in no format mtpd reads).
RESERVED_VARIABLES = frozenset(
    {
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "custom_tools",
        "self",
        "raise_exception",
        "strftime_now",
        "namespace",
    }
)


@dataclass(frozen=True)
class Chat:
    """A checked chat request, as the template and the reply's reader take it."""

    messages: list[dict[str, Any]]
    shown: list[dict[str, Any]]  # the OpenAI tools the template shows (tool_choice picks)
    schemas: dict[str, ToolSchema]  # by name, of the tools shown
    parallel_tool_calls: bool
    template_kwargs: dict[str, Any]
    forced: bool  # tool_choice 'required' or a named function: the reply is a call

    @classmethod
    def from_proto(cls, request: api.ChatRequest) -> Chat:
        if not request.messages:
            raise InvalidParameter("messages: at least one message is needed", "messages")
        tools, schemas = _tools(request.tools)
        choice = request.tool_choice
        if choice.WhichOneof("choice") == "function":
            if choice.function not in schemas:
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
        names = {t["function"]["name"] for t in shown}
        return cls(
            _messages(request.messages),
            shown,
            {name: schema for name, schema in schemas.items() if name in names},
            parallel,
            _template_kwargs(request.chat_template_kwargs),
            forced=choice.WhichOneof("choice") == "function" or choice.mode == "required",
        )

    def encode(self, tokenizer: Tokenizer) -> tuple[str, list[int]]:
        """The rendered prompt with the generation prompt added, and its token ids."""
        return tokenizer.encode_chat(
            self.messages, tools=self.shown or None, template_kwargs=self.template_kwargs
        )

    def reply_reader(
        self, tokenizer: Tokenizer, prompt: str, tool_call_parser: str, reasoning_parser: str
    ) -> AssistantOutput:
        """What splits the reply: the format the template teaches (or the one asked for),
        and reasoning where the template knows `<think>`. Tools the model would not see,
        or whose calls no parser could read, are refused: their calls would come back as
        text, silently."""
        assert tokenizer.templates is not None  # encode() rendered with it
        _, source = tokenizer.templates.source(bool(self.shown))  # as encode() renders
        tool_format = tool_format_of(source) if tool_call_parser == "auto" else tool_call_parser
        tool_format = None if tool_format == "none" else tool_format
        if self.shown and "tools" not in source:
            raise InvalidParameter(
                "tools: this model's chat template does not show tools to the model", "tools"
            )
        if self.shown and tool_format is None:
            raise InvalidParameter(
                "tools: mtpd reads no tool calls of this model's (its chat template teaches "
                "neither the hermes nor the xml format; mtpd serve --tool-call-parser)",
                "tools",
            )
        reasoning = reasoning_parser == "auto" and thinks(source)
        return AssistantOutput(
            self.schemas,
            tool_format,
            reasoning,
            in_reasoning=reasoning and opens_reasoning(prompt),
            parallel_tool_calls=self.parallel_tool_calls,
        )

    def forced_call(self, tool_format: str | None) -> OutputFormat | None:
        """What a forced tool call constrains the reply to: calls to the tools shown
        (one, unless parallel calls are allowed). Enforced for the Hermes format only;
        with the xml format the template's instruction is all that forces it."""
        if not self.forced or tool_format != "hermes":
            return None
        grammar = tool_call_grammar(self.shown, self.parallel_tool_calls)
        return OutputFormat("grammar", grammar, "tool_choice")


def _json_object(text: str, param: str) -> dict[str, Any]:
    try:
        value = loads_json(text)
    except ValueError as e:
        raise InvalidParameter(f"{param}: not valid JSON ({e})", param) from None
    if not isinstance(value, dict):
        raise InvalidParameter(f"{param}: must be a JSON object", param)
    return value


def _tools(tools: Sequence[api.Tool]) -> tuple[list[dict[str, Any]], dict[str, ToolSchema]]:
    """The tools as the template sees them (OpenAI's shape), and their schemas by name."""
    if len(tools) > MAX_TOOLS:
        raise InvalidParameter(f"tools: at most {MAX_TOOLS}, got {len(tools)}", "tools")
    out, schemas = [], {}
    for i, tool in enumerate(tools):
        param = f"tools[{i}].function"
        if not TOOL_NAME.fullmatch(tool.name):
            raise InvalidParameter(
                f"{param}.name: 1 to 64 letters, digits, '_' or '-', got {tool.name!r}",
                f"{param}.name",
            )
        if tool.name in schemas:
            raise InvalidParameter(f"{param}.name: {tool.name!r} twice", f"{param}.name")
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        parameters = None
        if tool.parameters:
            parameters = function["parameters"] = _json_object(
                tool.parameters, f"{param}.parameters"
            )
        schemas[tool.name] = tool_schema(parameters, f"{param}.parameters")
        out.append({"type": "function", "function": function})
    return out, schemas


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


def chat_prompt(daemon: Coordinator, request: api.ChatRequest, structured: bool) -> Prompt:
    """A chat request checked and rendered, with the reader of its reply and what a
    forced tool call constrains it to. `structured`: the request's options constrain
    the reply too."""
    chat, tokenizer = Chat.from_proto(request), daemon.tokenizer
    parsers = (daemon.tool_call_parser, daemon.reasoning_parser)
    text, ids = chat.encode(tokenizer)
    reader = chat.reply_reader(tokenizer, text, *parsers)
    forced = chat.forced_call(reader.tool_format)
    if forced is not None and structured:
        raise InvalidParameter(
            "structured_output: the forced tool call (tool_choice) constrains the reply "
            "already; send one of them",
            "structured_output",
        )
    if (forced is not None or structured) and reader.in_reasoning:
        # The constrained text is the reply's content: the reasoning the generation
        # prompt opened is closed first, as templates render enable_thinking=false.
        text += CLOSE_REASONING
        ids = ids + tokenizer.encode(CLOSE_REASONING)
        reader = chat.reply_reader(tokenizer, text, *parsers)
    return Prompt(ids, reader, forced)
