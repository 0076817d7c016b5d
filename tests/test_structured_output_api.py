"""Structured output through every API of a live `mtpd serve` with 2 CPU workers and an
MTP head: JSON valid against 20 hypothesis-generated schemas (checked by jsonschema, the
oracle), the same with MTP drafting on and off; json_object; a regex; gRPC and
`mtpd generate` alike."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from live_daemon import LiveDaemon, write_served_model

from mtpd.cli import main
from mtpd.client import Client, InvalidRequest

TOKEN = "structured-test-token"
MODEL = "tiny-structured"
MESSAGES = [{"role": "user", "content": "Reply in JSON."}]

# Schemas whose every instance is short: strings and arrays bounded, integers in a range,
# objects closed. `longest` is then a bound on an instance's bytes (the char tokenizer's
# tokens are one byte each), so a reply cut by max_tokens = longest + 1 (the end token)
# is a failure, never a budget too small.
NAMES = st.text("abcdxyz_", min_size=1, max_size=5)


def _string() -> st.SearchStrategy:
    return st.integers(0, 6).flatmap(
        lambda most: st.integers(0, most).map(
            lambda least: {"type": "string", "minLength": least, "maxLength": most}
        )
    )


def _integer() -> st.SearchStrategy:
    return st.tuples(st.integers(-1000, 1000), st.integers(0, 2000)).map(
        lambda p: {"type": "integer", "minimum": p[0], "maximum": p[0] + p[1]}
    )


LEAVES = st.one_of(
    _string(),
    _integer(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.one_of(st.integers(-50, 50), NAMES), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}
    ),
)


def _array(items: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(items, st.integers(0, 3)).flatmap(
        lambda p: st.integers(0, min(p[1], 1)).map(
            lambda least: {"type": "array", "items": p[0], "minItems": least, "maxItems": p[1]}
        )
    )


def _object(values: st.SearchStrategy) -> st.SearchStrategy:
    properties = st.dictionaries(NAMES, values, min_size=1, max_size=3)
    return properties.flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        )
    )


SCHEMAS = st.recursive(LEAVES, lambda inner: st.one_of(_array(inner), _object(inner)), max_leaves=5)


def longest(schema: dict) -> int:
    """An upper bound on the bytes of any instance, as mtpd writes JSON (", ", ": ")."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema["type"]
    if kind == "string":  # a character is at most an escape (\u001f) of 6 bytes
        return 2 + 6 * schema["maxLength"]
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind in ("boolean", "null"):
        return 5
    if kind == "array":
        n = schema["maxItems"]
        return 2 + n * longest(schema["items"]) + 2 * max(n - 1, 0)
    props = schema["properties"]
    return 2 + sum(len(json.dumps(k)) + 2 + longest(v) + 2 for k, v in props.items())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    model = write_served_model(tmp_path_factory.mktemp("served") / "model")
    live = LiveDaemon.with_http(model, tmp_path_factory.mktemp("daemon"), MODEL, TOKEN)
    yield live
    assert live.stop() == 0, live.log.read_text()


@pytest.fixture(scope="module")
def oai(daemon):
    return openai.OpenAI(base_url=daemon.url, api_key=TOKEN, max_retries=0, timeout=120)


def chat(oai, response_format, draft_tokens: int, **extra):
    return oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        response_format=response_format,
        extra_body={"draft_tokens": draft_tokens},
        **extra,
    ).choices[0]


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(schema=SCHEMAS)
def test_json_schema_replies_validate_and_mtp_changes_nothing(oai, schema):
    budget = longest(schema) + 1
    assert budget < 200  # the served model's context is 256
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    off = chat(oai, response_format, 0, max_tokens=budget)
    on = chat(oai, response_format, 3, max_tokens=budget)
    assert off.finish_reason == "stop", (schema, off.message.content)
    jsonschema.validate(json.loads(off.message.content), schema)
    assert on.message.content == off.message.content


def test_json_object_and_a_sampled_schema_with_and_without_drafts(oai):
    replies = [chat(oai, {"type": "json_object"}, k, max_tokens=200) for k in (0, 4)]
    assert isinstance(json.loads(replies[0].message.content), dict)
    assert replies[0].message.content == replies[1].message.content
    schema = {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
        "required": ["word", "ok"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    sampled = [
        oai.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            temperature=1.0,
            seed=21,
            response_format=response_format,
            extra_body={"draft_tokens": k},
        )
        .choices[0]
        .message.content
        for k in (0, 3)
    ]
    jsonschema.validate(json.loads(sampled[0]), schema)
    assert sampled[0] == sampled[1]


def test_a_regex_through_completions_grpc_and_the_cli(oai, daemon, capsys, tmp_path):
    regex = r"(yes|no), [a-z]{2,4}[0-9]"
    completion = oai.completions.create(
        model=MODEL,
        prompt="Answer:",
        max_tokens=32,
        temperature=0,
        extra_body={"structured_outputs": {"regex": regex}},
    ).choices[0]
    assert completion.finish_reason == "stop"
    with Client(daemon.address, token=daemon.token, timeout=60) as client:
        result = client.generate("Answer:", max_tokens=32, structured_output={"regex": regex})
        assert result.text == completion.text and result.finish_reason == "stop"
        with pytest.raises(InvalidRequest, match="structured_output"):
            client.generate("Answer:", max_tokens=8, structured_output={"regex": "(("})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    argv = ["generate", "--address", daemon.address, "--api-token-file", str(token_file)]
    argv += ["--raw", "--max-tokens", "32", "--json", "--regex", regex, "Answer:"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["text"] == completion.text
    assert re.fullmatch(regex, completion.text)
