"""A chat request's reply reader follows its model's template: the call format the
template teaches, and reasoning where it knows <think> (opened by the generation prompt
itself in Qwen3.5's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from mtpd.daemon.chat import Chat
from mtpd.model.errors import InvalidParameter
from mtpd.model.tokenizer import Tokenizer
from mtpd.v1 import inference_pb2 as api

TEMPLATES = Path(__file__).parent / "data/chat_templates"
TOOL = api.Tool(
    name="get_weather",
    parameters=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
XML_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "</function>\n</tool_call>"
)


def tokenizer(template: str) -> Tokenizer:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return Tokenizer(tok, (TEMPLATES / template).read_text(), None, [])


@pytest.mark.parametrize(
    ("template", "reply", "opened"),
    [
        ("Qwen-Qwen3-0.6B.jinja", f"<think>\nhm\n</think>\n\n{HERMES_CALL}", False),
        ("Qwen-Qwen2.5-7B-Instruct.jinja", HERMES_CALL, False),
        ("Qwen3-Coder.jinja", XML_CALL, False),
        # Qwen3.5's generation prompt opens <think> itself: the reply starts inside it.
        ("Qwen3.5-4B.jinja", f"hm\n</think>\n\n{XML_CALL}", True),
    ],
)
def test_reply_reader_takes_the_templates_format(template, reply, opened):
    tok = tokenizer(template)
    chat = Chat.from_proto(
        api.ChatRequest(messages=[api.ChatMessage(role="user", content="Weather?")], tools=[TOOL])
    )
    prompt, _ = chat.encode(tok)
    assert prompt.rstrip().endswith("<think>") == opened
    reader = chat.reply_reader(tok, prompt, "auto", "auto")
    out = reader.feed(reply) + reader.finish()
    assert out.content == ""
    assert out.reasoning.strip() == ("hm" if "think>" in reply else "")
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    # Reasoning not asked for, it stays in the content; tools whose calls would not be
    # read are refused rather than their calls returned as text.
    plain = chat.reply_reader(tok, prompt, "auto", "none")
    kept = plain.feed(reply) + plain.finish()
    assert kept.reasoning == "" and ("</think>" in kept.content) == ("think>" in reply)
    assert len(kept.tool_calls) == 1
    with pytest.raises(InvalidParameter, match="reads no tool calls"):
        chat.reply_reader(tok, prompt, "none", "auto")


def test_tools_a_template_cannot_show_or_teach_are_refused():
    request = api.ChatRequest(messages=[api.ChatMessage(role="user", content="Hi")], tools=[TOOL])
    chat = Chat.from_proto(request)
    silent = Tokenizer(tokenizer("Qwen3.5-4B.jinja")._tok, "{{ messages[0].content }}", None, [])
    with pytest.raises(InvalidParameter, match="does not show tools"):
        chat.reply_reader(silent, chat.encode(silent)[0], "auto", "auto")
    llama = tokenizer("meta-llama-Llama-3.1-8B-Instruct.jinja")  # JSON calls, no <tool_call>
    with pytest.raises(InvalidParameter, match="reads no tool calls"):
        chat.reply_reader(llama, chat.encode(llama)[0], "auto", "auto")


def test_enable_thinking_false_reaches_the_template():
    tok = tokenizer("Qwen-Qwen3-0.6B.jinja")
    messages = [api.ChatMessage(role="user", content="Hi")]
    off = Chat.from_proto(
        api.ChatRequest(messages=messages, chat_template_kwargs='{"enable_thinking": false}')
    )
    assert off.encode(tok)[0].endswith("<think>\n\n</think>\n\n")
    assert (
        not Chat.from_proto(api.ChatRequest(messages=messages))
        .encode(tok)[0]
        .endswith("</think>\n\n")
    )
