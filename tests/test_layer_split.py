"""How layers are split between workers, and the layouts that are refused."""

from __future__ import annotations

import pytest

from mtpd.daemon.split import layer_ranges, parse_split
from mtpd.model.errors import InputError


def test_even_split_covers_every_layer_once():
    assert layer_ranges(30, 1) == [(0, 30)]
    assert layer_ranges(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert layer_ranges(3, 3) == [(0, 1), (1, 2), (2, 3)]


def test_explicit_and_memory_proportional_splits():
    assert layer_ranges(30, 2, parse_split("10,20")) == [(0, 10), (10, 30)]
    ranges = layer_ranges(30, 3, free_memory=[8, 4, 4])
    assert [e - f for f, e in ranges] == [14, 8, 8]  # one each, the other 27 by 2:1:1
    # Even a worker with almost no memory gets a layer.
    assert [e - f for f, e in layer_ranges(4, 2, free_memory=[1000, 1])] == [3, 1]


@pytest.mark.parametrize(
    ("layers", "workers", "split", "message"),
    [
        (4, 5, None, "5 workers for a model of 4 layers"),
        (30, 2, "10,10", "sums to 20, but the model has 30 layers"),
        (30, 2, "10,10,10", "names 3 stages but there are 2 workers"),
        (30, 2, "30,0", "every worker needs at least one layer"),
        (30, 0, None, "--workers must be >= 1"),
    ],
)
def test_bad_layouts_are_refused_with_the_reason(layers, workers, split, message):
    with pytest.raises(InputError, match=message):
        layer_ranges(layers, workers, parse_split(split) if split else None)


def test_unparsable_split():
    with pytest.raises(InputError, match="expected layer counts"):
        parse_split("ten,twenty")
