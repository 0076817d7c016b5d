"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them.

A model's template is Jinja written for transformers, so it is rendered in the
environment transformers gives it: jinja2's immutable sandbox (the template is data
from a model file) with trim_blocks and lstrip_blocks, the loop controls, a `tojson`
that does not escape HTML and takes indent/separators/sort_keys, `raise_exception`,
`strftime_now`, a `{% generation %}` block that renders its body, and a `namespace`
that refuses underscore names. It sees what transformers passes: the messages with
their None-valued keys dropped and a reasoning text under each of its names, `tools`,
`documents`, `add_generation_prompt`, the special tokens and any extra keyword
(`enable_thinking` and the rest of a caller's `chat_template_kwargs`).

A checkpoint may carry several named templates (transformers' `tool_use`, `rag`, ...):
as transformers does, a request with tools takes `tool_use` where there is one, and
otherwise `default`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mtpd.model.errors import InputError

# A message's reasoning, under the names templates read it by (transformers' order).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(InputError, ValueError):
    """The chat template could not render these messages; the message says why."""


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the assistant's text for
    transformers' training masks; rendering shows the body unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace without underscore names (a way towards CPython's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template cannot set underscore names on a namespace ({name!r})"
            )


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from e


def template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as transformers shows it to the template: keys whose value is None
    dropped (templates test for a key, and would print "None"), and its reasoning under
    every name templates read it by."""
    out = {k: v for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in REASONING_FIELDS if out.get(k) is not None), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


class ChatTemplates:
    """A model's chat template, or its named ones."""

    def __init__(self, source: str | Mapping[str, str]) -> None:
        named = {"default": source} if isinstance(source, str) else dict(source)
        if not named:
            raise ChatTemplateError("the model's chat template list is empty")
        self._sources = named
        self._compiled: dict[str, jinja2.Template] = {}

    def source(self, tools: bool) -> tuple[str, str]:
        """The (name, source) a request takes, as transformers chooses: `tools` is whether
        a tool list is given at all (an empty one counts)."""
        if tools and "tool_use" in self._sources:
            name = "tool_use"
        elif "default" in self._sources:
            name = "default"
        elif len(self._sources) == 1:
            name = next(iter(self._sources))
        else:
            raise ChatTemplateError(
                f"the model has named chat templates ({', '.join(self._sources)}) and no "
                "'default' one"
            )
        return name, self._sources[name]

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
        documents: Sequence[Mapping[str, Any]] | None,
        variables: Mapping[str, Any],
    ) -> str:
        """`variables`: the special tokens and the caller's template keywords."""
        name, source = self.source(tools is not None)
        template = self._compiled.get(name)
        if template is None:
            template = self._compiled[name] = compile_template(source)
        try:
            return template.render(
                **variables,
                messages=[template_message(m) for m in messages],
                tools=list(tools) if tools is not None else None,
                documents=list(documents) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # the template is a model's data: any error of it is its own
            raise ChatTemplateError(f"chat template failed: {e}") from e
