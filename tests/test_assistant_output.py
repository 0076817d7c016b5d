"""A streamed reply split into reasoning, content and tool calls: only calls that name a
tool with arguments its schema accepts are calls, nothing else is lost, and how the text
is cut into pieces never changes the result."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtpd.daemon.assistant_output import (
    AssistantOutput,
    Delta,
    opens_reasoning,
    thinks,
    tool_format_of,
)
from mtpd.daemon.tool_schemas import tool_schema

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "where": {"type": "object"},
                "zip": {"type": ["string", "null"]},
            },
            "required": ["city"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: any object


def by_name(*tools: dict) -> dict:
    """Tools as a chat request hands them to the reader: checked schemas by name."""
    return {
        t["function"]["name"]: tool_schema(t["function"].get("parameters"), "parameters")
        for t in tools
    }


TOOLS = by_name(WEATHER, NOW)


def parse_reply(text: str, *args, **kwargs) -> Delta:
    """A whole reply, split as its streamed pieces would have been."""
    output = AssistantOutput(*args, **kwargs)
    return output.feed(text) + output.finish()


def hermes(name: str, arguments: object, key: str = "arguments") -> str:
    return f"<tool_call>\n{json.dumps({'name': name, key: arguments})}\n</tool_call>"


def calls(delta: Delta) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in delta.tool_calls]


def test_one_hermes_call():
    reply = parse_reply(hermes("get_weather", {"city": "Paris"}), TOOLS, "hermes", False)
    assert calls(reply) == [("get_weather", {"city": "Paris"})]
    assert reply.content == reply.reasoning == ""


def test_hermes_aliases_and_string_arguments():
    text = (
        hermes("get_weather", {"city": "Oslo"}, key="parameters")
        + hermes("get_weather", json.dumps({"city": "Köln"}))
        + '<tool_call>{"name": "now"}</tool_call>'
    )
    reply = parse_reply(text, TOOLS, "hermes", False)
    assert calls(reply) == [
        ("get_weather", {"city": "Oslo"}),
        ("get_weather", {"city": "Köln"}),
        ("now", {}),
    ]
    assert reply.tool_calls[1].arguments == '{"city": "Köln"}'  # not ASCII-escaped


def test_parallel_calls_and_the_whitespace_between_them():
    text = hermes("get_weather", {"city": "Paris"}) + "\n\n" + hermes("now", {}) + "\n"
    reply = parse_reply(text, TOOLS, "hermes", False)
    assert calls(reply) == [("get_weather", {"city": "Paris"}), ("now", {})]
    assert reply.content == ""


def test_without_parallel_calls_only_the_first_is_a_call():
    second = hermes("now", {})
    text = hermes("get_weather", {"city": "Paris"}) + "\n" + second
    reply = parse_reply(text, TOOLS, "hermes", False, parallel_tool_calls=False)
    assert calls(reply) == [("get_weather", {"city": "Paris"})]
    assert reply.content == second


def test_text_around_a_call():
    text = "Let me check.\n" + hermes("now", {}) + "\n\nDone, it seems."
    reply = parse_reply(text, TOOLS, "hermes", False)
    assert reply.content == "Let me check.\nDone, it seems."
    assert calls(reply) == [("now", {})]


def test_xml_call_typed_by_the_schema():
    text = (
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\n12345\n</parameter>\n"  # a string that looks like a number
        "<parameter=days>\n3\n</parameter>\n"
        "<parameter=metric>\ntrue\n</parameter>\n"
        '<parameter=where>\n{"lat": 1.5, "lon": 2}\n</parameter>\n'
        "<parameter=zip>\nnull\n</parameter>\n"
        "<parameter=note>\n\nline one\nline two\n\n</parameter>\n"  # not in the schema
        "</function>\n</tool_call>"
    )
    reply = parse_reply(text, TOOLS, "xml", False)
    assert calls(reply) == [
        (
            "get_weather",
            {
                "city": "12345",
                "days": 3,
                "metric": True,
                "where": {"lat": 1.5, "lon": 2},
                "zip": None,
                "note": "\nline one\nline two\n",  # one newline off each end
            },
        )
    ]
    assert reply.content == ""


def test_xml_single_parameter_and_no_parameters():
    one = "<tool_call><function=get_weather><parameter=city>Rome</parameter></function></tool_call>"
    none = "<tool_call>\n<function=now>\n</function>\n</tool_call>"
    reply = parse_reply(one + none, TOOLS, "xml", False)
    assert calls(reply) == [("get_weather", {"city": "Rome"}), ("now", {})]


@pytest.mark.parametrize(
    ("fmt", "block"),
    [
        ("hermes", '<tool_call>\n{"name": "now", "arguments": {</tool_call>'),  # bad JSON
        ("hermes", '<tool_call>{"name": "now", "arguments": [1]}</tool_call>'),  # not an object
        ("hermes", '<tool_call>{"name": "now", "arguments": NaN}</tool_call>'),
        ("hermes", hermes("rm_rf", {})),  # no such tool
        ("hermes", hermes("get_weather", {"days": 2})),  # city is required
        ("hermes", hermes("get_weather", {"city": 7})),  # a number where a string belongs
        ("xml", "<tool_call><function=nope></function></tool_call>"),
        ("xml", "<tool_call><function=get_weather></function></tool_call>"),  # no city
        (
            "xml",
            "<tool_call><function=get_weather><parameter=city>A</parameter>"
            "<parameter=days>three</parameter></function></tool_call>",  # not an integer
        ),
        (
            "xml",
            "<tool_call><function=get_weather><parameter=city>A</parameter>"
            "<parameter=city>B</parameter></function></tool_call>",  # a key given twice
        ),
        ("xml", "<tool_call><function=now>stray text</function></tool_call>"),
    ],
)
def test_an_invalid_call_stays_content_unchanged(fmt, block):
    text = "Trying: " + block + "\nok"
    reply = parse_reply(text, TOOLS, fmt, False)
    assert reply.tool_calls == []
    assert reply.content == text


def test_a_call_cut_off_at_the_end_is_content():
    output = AssistantOutput(TOOLS, "hermes", False)
    cut = '<tool_call>\n{"name": "now", "argu'
    assert output.feed("Hi " + cut) == Delta(content="Hi ")  # held while it might close
    assert output.finish() == Delta(content=cut)
    assert output.tool_calls == []


def test_reasoning_then_content_then_a_call():
    text = "<think>\nWhich city?\n</think>\n\nParis it is." + hermes("get_weather", {"city": "P"})
    reply = parse_reply(text, TOOLS, "hermes", True)
    assert reply.reasoning == "\nWhich city?\n"
    assert reply.content == "Paris it is."
    assert calls(reply) == [("get_weather", {"city": "P"})]


def test_reasoning_opened_by_the_prompt():
    reply = parse_reply("Let me think.</think>\n\nHello.", None, None, True, in_reasoning=True)
    assert reply == Delta(content="Hello.", reasoning="Let me think.")
    unclosed = parse_reply("still thinking", None, None, True, in_reasoning=True)
    assert unclosed == Delta(reasoning="still thinking")


def test_think_only_opens_reasoning_at_the_start():
    assert parse_reply("  \n<think>x</think>y", None, None, True) == Delta("y", "x")
    late = "Hello <think>x</think>"
    assert parse_reply(late, None, None, True) == Delta(content=late)
    assert parse_reply("<thin", None, None, True) == Delta(content="<thin")


def test_without_reasoning_think_is_content():
    text = "<think>x</think>\n\ny"
    assert parse_reply(text, None, None, False) == Delta(content=text)


def test_no_tool_parsing_without_tools_or_a_format():
    text = hermes("now", {})
    assert parse_reply(text, None, "hermes", False) == Delta(content=text)
    assert parse_reply(text, [], "hermes", False) == Delta(content=text)
    assert parse_reply(text, TOOLS, None, False) == Delta(content=text)


def test_tags_split_across_pieces_are_held_back():
    output = AssistantOutput(TOOLS, "hermes", True)
    assert output.feed(" <th") == Delta()
    assert output.feed("ink>a </th") == Delta(reasoning="a ")
    assert output.feed("ink>b <tool") == Delta(content="b ")
    assert output.feed("box") == Delta(content="<toolbox")
    assert output.feed(" <tool_") == Delta(content=" ")
    whole = output.feed('call>{"name": "now"}</tool_call> ')
    assert calls(whole) == [("now", {})]
    assert whole.content == ""
    assert output.finish() == Delta()


def test_call_ids_are_unique():
    reply = parse_reply(hermes("now", {}) * 50, TOOLS, "hermes", False)
    ids = [c.id for c in reply.tool_calls]
    assert len(set(ids)) == 50
    assert all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() for i in ids)


def test_template_and_prompt_detection():
    qwen3 = "{{- '<tool_call>\\n' }}...<think>\\n\\n</think>"
    coder = "<tool_call>\n<function=example>\n<parameter=example_parameter_1>\nvalue\n"
    assert (tool_format_of(qwen3), tool_format_of(coder), tool_format_of("{{ x }}")) == (
        "hermes",
        "xml",
        None,
    )
    assert thinks(qwen3) and not thinks(coder)
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_reasoning("user: what is <think>?<|im_start|>assistant\n")


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="tool_format"):
        AssistantOutput(TOOLS, "json", False)


XML_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\n12\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
)
# (reply, keyword arguments): calls, invalid calls, reasoning, near-miss tags.
SAMPLES = [
    ("Plain text with <b>tags</b>, < and <tool and </think> in it.\n", {}),
    (
        "  \n<think>\nHmm </thin </think>\n\nSure.<tool_call"
        + hermes("now", {})
        + " \n"
        + hermes("rm", {})
        + "\n"
        + hermes("get_weather", {"city": "P"})
        + "\n\nBye <tool_call>{",
        {"tools": TOOLS, "tool_format": "hermes", "reasoning": True},
    ),
    (
        "thinking <think> more</think>"
        + XML_CALL
        + " x "
        + XML_CALL
        + XML_CALL.replace("days>\n2", "days>\ntwo"),
        {"tools": TOOLS, "tool_format": "xml", "reasoning": True, "in_reasoning": True},
    ),
    (
        hermes("now", {}) + hermes("now", {"a": 1}) + "<think>late</think>",
        {"tools": TOOLS, "tool_format": "hermes", "reasoning": True, "parallel_tool_calls": False},
    ),
    ("<thin", {"reasoning": True}),
    ("<think>open to the end </thi", {"reasoning": True}),
]


def run_pieces(
    pieces: list[str], tools=None, tool_format=None, reasoning=False, **kwargs
) -> tuple[str, str, list[tuple[str, str]]]:
    """(content, reasoning, calls as (name, arguments)) of a reply fed in these pieces."""
    output = AssistantOutput(tools, tool_format, reasoning, **kwargs)
    deltas = [output.feed(piece) for piece in pieces] + [output.finish()]
    content = "".join(d.content for d in deltas)
    reasoning = "".join(d.reasoning for d in deltas)
    made = [(c.name, c.arguments) for d in deltas for c in d.tool_calls]
    assert made == [(c.name, c.arguments) for c in output.tool_calls]
    return content, reasoning, made


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_split_gives_the_same_reply(data):
    text, kwargs = data.draw(st.sampled_from(SAMPLES))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    whole = run_pieces([text], **kwargs)
    assert run_pieces(pieces, **kwargs) == whole
    if not kwargs.get("tools") and not kwargs.get("reasoning"):
        assert whole == (text, "", [])


@pytest.mark.parametrize(("text", "kwargs"), SAMPLES)
def test_one_character_at_a_time(text, kwargs):
    assert run_pieces(list(text), **kwargs) == run_pieces([text], **kwargs)


def test_what_the_samples_give():
    """The split test above only compares; this pins what the samples mean."""
    content, reasoning, made = run_pieces([SAMPLES[1][0]], **SAMPLES[1][1])
    assert reasoning == "\nHmm </thin "
    assert [name for name, _ in made] == ["now", "get_weather"]
    assert content == "Sure.<tool_call" + hermes("rm", {}) + "\nBye <tool_call>{"
    content, reasoning, made = run_pieces([SAMPLES[2][0]], **SAMPLES[2][1])
    assert reasoning == "thinking <think> more"
    assert made == [("get_weather", '{"city": "12", "days": 2}')] * 2
    assert content == "x " + XML_CALL.replace("days>\n2", "days>\ntwo")


def test_a_long_unclosed_call_costs_linear_time_and_turns_to_text():
    from mtpd.daemon.assistant_output import MAX_CALL

    output = AssistantOutput(TOOLS, "hermes", False)
    began = time.monotonic()
    text = "<tool_call>" + "x" * 4
    got = output.feed(text)
    for _ in range(MAX_CALL // 4 + 1):
        got += output.feed("x" * 4)
    assert time.monotonic() - began < 5  # rescanning from the start: minutes
    got += output.finish()
    assert got.tool_calls == [] and got.content.startswith("<tool_call>xxxx")
    assert len(got.content) == len(text) + 4 * (MAX_CALL // 4 + 1)


def test_a_fresh_reader_reads_another_reply_alike_and_apart():
    """n choices of one request: each reply its own reader, configured alike."""
    first = AssistantOutput(TOOLS, "hermes", True, in_reasoning=True)
    first.feed("thinking</think>\n" + hermes("now", {})[:8])
    second = first.fresh()
    got = second.feed("also</think>\n" + hermes("now", {})) + second.finish()
    assert got.reasoning == "also" and [c.name for c in got.tool_calls] == ["now"]
    assert first.tool_calls == []  # the first reply's call is still open
