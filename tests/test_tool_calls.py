"""Tool calling and reasoning end to end: a live `mtpd serve --http` with 2 CPU workers
serves a tiny model trained to call `get_weather` (tests/tool_model.py, Qwen3's
template), driven by the official `openai` package, the gRPC SDK and `mtpd chat`: the
call, the tool's answer, the final reply, and the <think> blocks split off as reasoning,
streamed and not, with MTP drafting on and off."""

from __future__ import annotations

import io
import json

import jsonschema
import openai
import pytest
from live_daemon import LiveDaemon
from tiny_models import add_mtp_head
from tool_model import (
    ANSWER,
    ANSWER_REASONING,
    CALL_ARGUMENTS,
    CALL_REASONING,
    QUESTION,
    TOOL_RESULT,
    WEATHER,
    answered,
    write_tool_model,
)

from mtpd.cli import main
from mtpd.client import Client, InvalidRequest

TOKEN = "tool-test-token"
MODEL = "tiny-tools"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    model = write_tool_model(tmp_path_factory.mktemp("tools") / "model")
    add_mtp_head(model)
    live = LiveDaemon.with_http(
        model, tmp_path_factory.mktemp("daemon"), MODEL, TOKEN, "--max-context", "1024"
    )
    yield live
    assert live.stop() == 0, live.log.read_text()


@pytest.fixture(scope="module")
def oai(daemon):
    return openai.OpenAI(base_url=daemon.url, api_key=TOKEN, max_retries=0, timeout=120)


def ask(oai, messages, **extra):
    extra = {"tools": [WEATHER], "temperature": 0, "max_tokens": 120, **extra}
    return oai.chat.completions.create(model=MODEL, messages=messages, **extra)


def streamed(oai, messages, **extra) -> dict:
    """A streamed reply put together as a client does: content, reasoning and calls."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in ask(oai, messages, stream=True, **extra):
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            calls[call.index]["name"] += call.function.name or ""
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return {
        "content": content,
        "reasoning": reasoning,
        "calls": list(calls.values()),
        "finish": finish,
    }


def whole(reply) -> dict:
    message = reply.choices[0].message
    return {
        "content": message.content or "",
        "reasoning": getattr(message, "reasoning_content", None) or "",
        "calls": [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in message.tool_calls or []
        ],
        "finish": reply.choices[0].finish_reason,
    }


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_round_trip_call_then_answer(oai, stream):
    get = (
        (lambda m, **x: streamed(oai, m, **x))
        if stream
        else (lambda m, **x: whole(ask(oai, m, **x)))
    )
    first = get(QUESTION)
    assert first["finish"] == "tool_calls"
    assert first["content"] == ""  # the <think> block is reasoning, the call is a call
    assert first["reasoning"].strip() == CALL_REASONING
    [call] = first["calls"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == CALL_ARGUMENTS
    assert call["id"].startswith("call_")

    final = get(answered(call["id"]))
    assert final == {
        "content": ANSWER,
        "reasoning": final["reasoning"],
        "calls": [],
        "finish": "stop",
    }
    assert final["reasoning"].strip() == ANSWER_REASONING


def test_mtp_on_and_off_reply_alike(oai):
    """Drafting changes only speed: the same call, reasoning and answer with it off."""
    replies = [whole(ask(oai, QUESTION, extra_body={"draft_tokens": k})) for k in (0, 3)]
    for r in replies:
        r["calls"] = [{**c, "id": None} for c in r["calls"]]  # ids are fresh each time
    assert replies[0] == replies[1] and replies[0]["calls"]
    answers = [whole(ask(oai, answered("call_x"), extra_body={"draft_tokens": k})) for k in (0, 3)]
    assert answers[0] == answers[1] and answers[0]["content"] == ANSWER


CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {
                "zone": {"enum": ["UTC", "CET"]},
                # A keyword llguidance does not enforce: let through, checked after.
                "link": {"type": "string", "maxLength": 8, "format": "uri-reference"},
            },
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize(
    "choice",
    [{"type": "function", "function": {"name": "get_time"}}, "required"],
    ids=["named", "required"],
)
def test_a_forced_tool_call_is_a_valid_call_with_mtp_on_and_off(oai, choice):
    """After the tool's answer the model would reply in words; a forced call makes the
    reply a call (of the named tool), its arguments valid against the tool's schema."""
    replies = [
        whole(
            ask(
                oai,
                answered("call_x"),
                tools=[WEATHER, CLOCK],
                tool_choice=choice,
                parallel_tool_calls=False,
                extra_body={"draft_tokens": k},
            )
        )
        for k in (0, 3)
    ]
    for r in replies:
        r["calls"] = [{**c, "id": None} for c in r["calls"]]
    assert replies[0] == replies[1]
    [call] = replies[0]["calls"]
    assert replies[0]["finish"] == "tool_calls" and replies[0]["content"] == ""
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call["name"]]
    if choice != "required":
        assert call["name"] == "get_time"
    jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])


def test_a_forced_call_and_a_response_format_at_once_are_refused(oai):
    with pytest.raises(openai.BadRequestError, match="one of them"):
        ask(oai, QUESTION, tool_choice="required", response_format={"type": "json_object"})


def test_tool_choice_none_shows_no_tools_and_parses_no_call(oai):
    reply = whole(ask(oai, QUESTION, tool_choice="none", max_tokens=40))
    assert reply["calls"] == [] and reply["finish"] != "tool_calls"


def test_grpc_sdk_round_trip(daemon):
    with Client(daemon.address, token=TOKEN, timeout=60) as client:
        first = client.chat(QUESTION, tools=[WEATHER], max_tokens=120)
        assert first.finish_reason == "tool_calls" and first.text == ""
        assert first.reasoning.strip() == CALL_REASONING
        [call] = first.tool_calls
        assert json.loads(call.arguments) == CALL_ARGUMENTS
        history = [
            *QUESTION,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT},
        ]
        final = client.chat(history, tools=[WEATHER], max_tokens=120)
        assert (final.text, final.finish_reason, final.tool_calls) == (ANSWER, "stop", [])
        # The checks are the same as the HTTP API's, named alike.
        with pytest.raises(InvalidRequest, match=r"tool_choice: 'launch' names no tool"):
            client.chat(QUESTION, tools=[WEATHER], tool_choice="launch")
        with pytest.raises(InvalidRequest, match=r"messages\[1\]\.tool_call_id"):
            client.chat([*QUESTION, {"role": "tool", "tool_call_id": "c9", "content": "x"}])


def test_mtpd_chat_calls_the_tool_and_reads_its_result(daemon, tmp_path, monkeypatch, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    remote = ["--address", daemon.address, "--api-token-file", str(token_file)]
    # The question, then the tool's result for the call the reply makes.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION[0]['content']}\n{TOOL_RESULT}\n"))
    assert main(["chat", "--tools", str(tools), "--max-tokens", "120", "--json", *remote]) == 0
    first, final = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["finish_reason"] == "tool_calls"
    assert [c["name"] for c in first["tool_calls"]] == ["get_weather"]
    assert first["reasoning"].strip() == CALL_REASONING
    assert (final["text"], final["finish_reason"]) == (ANSWER, "stop")
