"""A tool's schema is the caller's and the call is the model's: the schema is checked
once with errors that name it, and checking a call can neither fetch, stall nor crash
(found by a review, each tried here as an attacker would)."""

from __future__ import annotations

import json
import time

import pytest

from mtpd.daemon.strict_json import loads_json
from mtpd.daemon.tool_schemas import MAX_DEPTH, tool_schema
from mtpd.model.errors import InvalidParameter


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"$ref": "http://127.0.0.1:9/probe"}, "only references within the schema"),
        ({"properties": {"a": {"$ref": "file:///dev/zero"}}}, "only references within"),
        ({"$dynamicRef": "urn:x"}, "only references within"),
        ({"$schema": []}, "is none of the JSON schema drafts"),
        ({"$schema": "https://example.com/my-draft"}, "is none of the JSON schema drafts"),
        ({"patternProperties": {"^(a+)+$": {}}}, "patternProperties is not supported"),
        ({"type": 5}, "not a valid JSON schema"),
        ({"type": "object", "minProperties": -1}, "not a valid JSON schema"),
    ],
)
def test_a_bad_schema_is_refused_naming_it(schema, words):
    with pytest.raises(InvalidParameter, match=words) as caught:
        tool_schema(schema, "tools[0].function.parameters")
    assert caught.value.param == "tools[0].function.parameters"


def test_a_deep_schema_is_refused_before_jsonschema_recurses():
    schema: dict = {}
    for _ in range(MAX_DEPTH + 5):
        schema = {"properties": {"a": schema}}
    with pytest.raises(InvalidParameter, match="nested deeper than"):
        tool_schema(schema, "p")


def test_calls_that_break_validation_are_no_calls():
    recursive = tool_schema({"$ref": "#"}, "p")  # refers to itself, forever
    assert recursive.accepts({}) is False
    money = tool_schema({"properties": {"a": {"multipleOf": 0.1}}}, "p")
    assert money.accepts({"a": int("1" + "0" * 400)}) is False  # too large for a float
    assert money.accepts({"a": 0.5}) is True


def test_pattern_is_not_checked_and_cannot_stall():
    schema = tool_schema({"properties": {"a": {"type": "string", "pattern": "^(a+)+$"}}}, "p")
    began = time.monotonic()
    assert schema.accepts({"a": "a" * 40 + "!"})  # 2^40 steps for Python's re
    assert time.monotonic() - began < 1


def test_unique_items_is_linear_and_compares_as_json_schema_does():
    schema = tool_schema({"properties": {"a": {"type": "array", "uniqueItems": True}}}, "p")
    many = [{"k": [i]} for i in range(20000)]
    began = time.monotonic()
    assert schema.accepts({"a": many})
    assert time.monotonic() - began < 2  # jsonschema's own check: minutes
    assert not schema.accepts({"a": [1, 1.0]})  # equal numbers
    assert schema.accepts({"a": [1, True]})  # a boolean is no number
    assert not schema.accepts({"a": [{"x": 1, "y": 2}, {"y": 2, "x": 1}]})


def test_local_references_resolve():
    schema = tool_schema(
        {
            "$defs": {"city": {"type": "string"}},
            "properties": {"from": {"$ref": "#/$defs/city"}},
        },
        "p",
    )
    assert schema.accepts({"from": "Paris"}) and not schema.accepts({"from": 5})


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": 1e400}', "-1e999"])
def test_json_that_json_dumps_would_not_write_back_is_no_json(text):
    with pytest.raises(ValueError):
        loads_json(text)
    assert loads_json('{"a": 1e300}') == {"a": 1e300}


def test_json_nested_too_deeply_is_a_value_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_json("[" * 100000 + "]" * 100000)
    assert json.loads("[[1]]") == loads_json("[[1]]")
