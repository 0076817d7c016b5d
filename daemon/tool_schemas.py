"""A tool's `parameters` schema: checked once at the front, and the validator that then
checks the model's calls against it. The schema is the caller's, and the call is
checked on the daemon's event loop, so the validator can neither fetch nor stall:

- it resolves references inside the schema only (`#...`); any other `$ref` is refused
  at the front, and its registry can retrieve nothing (jsonschema would otherwise
  fetch http:// and file:// references);
- `pattern` is not checked, and `patternProperties` is refused: Python's regular
  expressions can take exponential time on a caller's pattern and the model's text;
- `uniqueItems` is checked in linear time (jsonschema's check is quadratic);
- schemas nest at most MAX_DEPTH levels, and any error while validating (a recursive
  reference, a number too large for `multipleOf`) makes the call no call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema import SchemaError, ValidationError, validators
from jsonschema.protocols import Validator
from referencing import Registry

from mtpd.model.errors import InvalidParameter

log = logging.getLogger("mtpd.chat")

MAX_DEPTH = 32
MAX_MESSAGE = 200  # characters of jsonschema's message quoted in an error
_DRAFTS = {
    cls.ID_OF(cls.META_SCHEMA).rstrip("#"): cls
    for cls in (
        validators.Draft202012Validator,
        validators.Draft201909Validator,
        validators.Draft7Validator,
        validators.Draft6Validator,
        validators.Draft4Validator,
    )
}
_REFERENCES = ("$ref", "$dynamicRef", "$recursiveRef")


def _unique_items(validator: Validator, unique: Any, instance: Any, schema: Any) -> Iterator:
    if unique and validator.is_type(instance, "array"):
        seen = set()
        for item in instance:
            key = json.dumps(_canonical(item), sort_keys=True)
            if key in seen:
                yield ValidationError(f"{instance!r} has non-unique elements")
                return
            seen.add(key)


def _canonical(value: Any) -> Any:
    """As JSON schema compares values: 1 and 1.0 are equal, true and 1 are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _unchecked(*_: Any) -> Iterator:
    return iter(())


# Each draft's validator with the two keywords above replaced.
_SAFE = {
    draft: validators.extend(draft, {"pattern": _unchecked, "uniqueItems": _unique_items})
    for draft in _DRAFTS.values()
}


@dataclass(frozen=True)
class ToolSchema:
    """A tool's parameters and the validator of its calls' arguments (None: any object)."""

    parameters: Mapping[str, Any]
    validator: Validator | None

    def accepts(self, arguments: Any) -> bool:
        if self.validator is None:
            return True
        try:
            return self.validator.is_valid(arguments)
        except Exception as e:  # a recursive reference, an overflow: no call, not a crash
            log.info("a call's arguments could not be validated: %r", e)
            return False


def tool_schema(schema: Mapping[str, Any] | None, param: str) -> ToolSchema:
    """The checked schema of a tool's parameters (InvalidParameter naming `param`)."""
    if schema is None:
        return ToolSchema({}, None)
    _check_shape(schema, param, 0)
    declared = schema.get("$schema")
    if declared is not None and (
        not isinstance(declared, str) or declared.rstrip("#") not in _DRAFTS
    ):
        raise InvalidParameter(
            f"{param}: $schema {declared!r} is none of the JSON schema drafts mtpd knows "
            f"({', '.join(sorted(_DRAFTS))})",
            param,
        )
    draft = _DRAFTS.get(declared.rstrip("#")) if declared else validators.Draft202012Validator
    try:
        draft.check_schema(schema)
    except SchemaError as e:
        raise InvalidParameter(
            f"{param}: not a valid JSON schema: {e.message[:MAX_MESSAGE]}", param
        ) from None
    except RecursionError:
        raise InvalidParameter(f"{param}: nested too deeply", param) from None
    return ToolSchema(schema, _SAFE[draft](schema, registry=Registry()))


def _check_shape(value: Any, param: str, depth: int) -> None:
    """At most MAX_DEPTH levels, references inside the schema only, no patternProperties."""
    if depth > MAX_DEPTH:
        raise InvalidParameter(f"{param}: nested deeper than {MAX_DEPTH} levels", param)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in _REFERENCES and not (isinstance(item, str) and item.startswith("#")):
                raise InvalidParameter(
                    f"{param}: {key} {item!r}: only references within the schema (#...) "
                    "are followed",
                    param,
                )
            if key == "patternProperties":
                raise InvalidParameter(
                    f"{param}: patternProperties is not supported (a regular expression "
                    "of the caller's could stall the server)",
                    param,
                )
            _check_shape(item, param, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_shape(item, param, depth + 1)
