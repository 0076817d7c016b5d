"""JSON from callers and from the model, read strictly: what Python's json module lets
through that is no JSON is refused."""

from __future__ import annotations

import json
import math
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a float")
    return value


def loads_json(text: str) -> Any:
    """json.loads without NaN and Infinity, nor numbers beyond a float's range (which
    json.dumps would write back as Infinity, no JSON either); JSON nested too deeply to
    read is a ValueError too."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError as e:
        raise ValueError("JSON nested too deeply") from e
