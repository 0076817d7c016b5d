"""A model's streamed chat reply split into reasoning, content and tool calls.

Reasoning models wrap their thinking in <think>...</think>; tool-using models write calls
as <tool_call>...</tool_call> blocks, either Hermes JSON (Hermes, Qwen2.5, Qwen3) or
Qwen3-Coder/Qwen3.5's <function=NAME><parameter=KEY>VALUE</parameter></function>. The
text arrives a few characters at a time, so, as `StopMatcher` does for stop sequences,
any tail that could be the start of a tag is held back until the next text settles it:
how the reply is cut into pieces never changes what comes out.

A call is only a call when it names one of the request's tools with arguments its
schema accepts; anything else stays in the content as the model wrote it, so a client
never receives a call it cannot run and no text is lost.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mtpd.daemon.options import TOOL_FORMATS
from mtpd.daemon.strict_json import loads_json
from mtpd.daemon.tool_schemas import ToolSchema

MAX_CALL = 1 << 18  # characters a <tool_call> block may hold before it is taken for text
MAX_OPENING = 1 << 12  # characters of whitespace awaited before a <think>

_THINK, _END_THINK = "<think>", "</think>"
CLOSE_REASONING = "</think>\n\n"  # as templates close reasoning they skip
_CALL, _END_CALL = "<tool_call>", "</tool_call>"
_ID_ALPHABET = string.ascii_letters + string.digits
_JSON_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
_FUNCTION = re.compile(r"\s*<function=([^>]*)>(.*)</function>\s*", re.DOTALL)
_PARAMETER = re.compile(r"\s*<parameter=([^>]*)>(.*?)</parameter>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    id: str  # "call_" + 24 random letters and digits, as OpenAI's ids look
    name: str
    arguments: str  # JSON text of an object


@dataclass
class Delta:
    """What a piece of the reply adds to each part of it."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __add__(self, later: Delta) -> Delta:
        return Delta(
            self.content + later.content,
            self.reasoning + later.reasoning,
            self.tool_calls + later.tool_calls,
        )


def tool_format_of(template_source: str) -> str | None:
    """'xml' if the template shows Qwen3-Coder/Qwen3.5's <function=NAME><parameter=KEY>
    format, else 'hermes' if it shows <tool_call> (Hermes/Qwen2.5/Qwen3 JSON), else None.
    The template teaches the model its format, so it is the surest sign of it."""
    if "<function=" in template_source and "<parameter=" in template_source:
        return "xml"
    return "hermes" if _CALL in template_source else None


def thinks(template_source: str) -> bool:
    """The template knows <think>...</think>, so its model's replies may carry reasoning."""
    return _THINK in template_source and _END_THINK in template_source


def opens_reasoning(prompt_text: str) -> bool:
    """Whether the rendered prompt ends inside an open <think> block (Qwen3.5 and others
    put '<think>\\n' in the generation prompt), so the reply starts as reasoning. Only the
    prompt's end counts: a "<think>" a user typed earlier opens nothing."""
    return prompt_text.rstrip().endswith(_THINK)


def partial_end(tag: str, text: str) -> int:
    """The length of the longest end of `text` that begins `tag`: what to hold back."""
    return next(
        (n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0
    )


def _is_type(value: Any, name: str) -> bool:
    """Whether `value` is of the JSON schema type `name` (as jsonschema counts 1.0 an integer)."""
    integer = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return {
        "null": value is None,
        "boolean": isinstance(value, bool),
        "integer": integer and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[name]


def _typed(value: str, schema: Any) -> Any:
    """An XML parameter's text as the value its schema property asks for. The model writes
    every value bare, so only the schema tells the string "42" from the number 42.
    Raises ValueError where the schema asks for JSON that the text is not."""
    types = schema.get("type") if isinstance(schema, Mapping) else None
    listed = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    known = [t for t in listed if t in _JSON_TYPES]
    if not known or "string" in known:
        try:
            parsed = loads_json(value)
        except ValueError:
            return value
        if not known:
            return parsed
        return parsed if any(_is_type(parsed, t) for t in known if t != "string") else value
    return loads_json(value)


class AssistantOutput:
    """One reply's text, fed as it is generated, split into reasoning, content and calls.

    tools: the request's tools by name, with their checked schemas (tool_schemas.py).
    With no tools or no tool_format, calls are not looked for and their text stays
    content. reasoning: the
    model may think in <think>...</think>; in_reasoning: the prompt already opened it.
    parallel_tool_calls=False: only the first valid call is a call.
    """

    def __init__(
        self,
        tools: Mapping[str, ToolSchema] | None,
        tool_format: str | None,
        reasoning: bool,
        in_reasoning: bool = False,
        parallel_tool_calls: bool = True,
    ) -> None:
        if tool_format is not None and tool_format not in TOOL_FORMATS:
            raise ValueError(f"tool_format {tool_format!r} is not one of {TOOL_FORMATS}")
        self._arguments = (tools, tool_format, reasoning, in_reasoning, parallel_tool_calls)
        self._tools = dict(tools or {}) if tool_format is not None else {}
        self.tool_format = tool_format
        self.in_reasoning = reasoning and in_reasoning  # the reply starts as reasoning
        self._parallel = parallel_tool_calls
        # "start": whether the reply opens <think> is not known yet; then "reasoning",
        # "content", or "call" (inside a <tool_call> block, held until it closes).
        self._state = "content" if not reasoning else "reasoning" if in_reasoning else "start"
        self._held = ""
        self._searched = 0  # of a held call: how far </tool_call> was looked for
        self._strip = False  # after </think> or a call, leading whitespace is no content
        self._calls: list[ToolCall] = []

    def fresh(self) -> AssistantOutput:
        """A reader of another reply to the same request (another of its n choices)."""
        return AssistantOutput(*self._arguments)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Every call emitted so far."""
        return list(self._calls)

    def feed(self, text: str) -> Delta:
        """Streamed text in; what may be emitted now (the rest is held until it is known)."""
        delta = Delta()
        self._held += text
        while self._step(delta):
            pass
        return delta

    def finish(self) -> Delta:
        """The generation ended: everything held back, as what it would have been. A call
        left open was cut off, so it is content, not a call."""
        delta = Delta()
        held, self._held = self._held, ""
        if self._state == "reasoning":
            delta.reasoning += held
        else:
            self._content(delta, held)
        return delta

    @property
    def _parsing_calls(self) -> bool:
        return bool(self._tools) and (self._parallel or not self._calls)

    def _step(self, delta: Delta) -> bool:
        """Moves through the held text as far as it is known; True while it got further."""
        held = self._held
        if self._state == "start":
            rest = held.lstrip()
            if rest.startswith(_THINK):
                self._held, self._state = rest[len(_THINK) :], "reasoning"
                return True
            # Only whitespace, or part of the tag so far (a bounded wait: stripping a
            # growing run of whitespace at every feed would cost quadratic time).
            if _THINK.startswith(rest) and len(held) < MAX_OPENING:
                return False
            self._state = "content"
            return True
        if self._state == "reasoning":
            end = held.find(_END_THINK)
            if end >= 0:
                delta.reasoning += held[:end]
                self._held, self._state, self._strip = (
                    held[end + len(_END_THINK) :],
                    "content",
                    True,
                )
                return True
            keep = len(held) - partial_end(_END_THINK, held)
            delta.reasoning += held[:keep]
            self._held = held[keep:]
            return False
        if self._state == "content":
            if not self._parsing_calls:
                self._content(delta, held)
                self._held = ""
                return False
            start = held.find(_CALL)
            if start >= 0:
                self._content(delta, held[:start])
                self._held, self._state = held[start:], "call"
                return True
            keep = len(held) - partial_end(_CALL, held)
            self._content(delta, held[:keep])
            self._held = held[keep:]
            return False
        end = held.find(_END_CALL, max(len(_CALL), self._searched - len(_END_CALL)))
        if end < 0:
            self._searched = len(held)
            if len(held) > MAX_CALL:  # no call is this long: the model is writing text
                self._content(delta, held)
                self._held, self._state = "", "content"
            return False
        self._searched = 0
        end += len(_END_CALL)
        self._held, self._state = held[end:], "content"
        call = self._call(held[len(_CALL) : end - len(_END_CALL)])
        if call is None:
            self._content(delta, held[:end])
        else:
            self._calls.append(call)
            delta.tool_calls.append(call)
            self._strip = True
        return True

    def _content(self, delta: Delta, text: str) -> None:
        if self._strip:
            text = text.lstrip()
            self._strip = not text
        delta.content += text

    def _call(self, body: str) -> ToolCall | None:
        """The call a <tool_call> block's body makes, or None where it is no valid call."""
        try:
            name, arguments = (
                self._hermes(body) if self.tool_format == "hermes" else self._xml(body)
            )
        except ValueError:
            return None
        tool = self._tools.get(name)
        if tool is None or not isinstance(arguments, dict) or not tool.accepts(arguments):
            return None
        call_id = "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))
        return ToolCall(call_id, name, json.dumps(arguments, ensure_ascii=False))

    @staticmethod
    def _hermes(body: str) -> tuple[str, Any]:
        """{"name": ..., "arguments": {...}}; "parameters" is read as "arguments" (as vLLM's
        hermes parser does), arguments may be JSON text of an object, and a call with
        neither takes no arguments."""
        call = loads_json(body)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError("not a Hermes call")
        arguments = call.get("arguments", call.get("parameters", {}))
        return call["name"], loads_json(arguments) if isinstance(arguments, str) else arguments

    def _xml(self, body: str) -> tuple[str, dict[str, Any]]:
        """<function=NAME> <parameter=KEY>VALUE</parameter>... </function>, the values typed
        by the tool's schema. A key given twice is ambiguous, so no call."""
        function = _FUNCTION.fullmatch(body)
        if function is None:
            raise ValueError("not an XML call")
        name, inner = function.groups()
        tool = self._tools.get(name)
        properties = tool.parameters.get("properties") if tool is not None else None
        arguments: dict[str, Any] = {}
        position = 0
        while parameter := _PARAMETER.match(inner, position):
            key, value = parameter.groups()
            if key in arguments:
                raise ValueError(f"parameter {key!r} given twice")
            value = value.removeprefix("\n").removesuffix("\n")
            schema = properties.get(key) if isinstance(properties, Mapping) else None
            arguments[key] = _typed(value, schema)
            position = parameter.end()
        if inner[position:].strip():
            raise ValueError("text between an XML call's parameters")
        return name, arguments
