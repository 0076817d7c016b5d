"""A request's n choices merged (daemon/choices.py): one choice's error ends them all as
itself, and the caller can then close every stream, as the gRPC service does."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mtpd.daemon.choices import merged
from mtpd.daemon.request import RequestFailed


async def failing():
    yield "a0"
    await asyncio.sleep(0.01)
    raise RequestFailed("the pipeline failed")


async def slow(closed: list[str]):
    try:
        yield "b0"
        await asyncio.sleep(10)
        yield "b1"
    finally:
        closed.append("b")


def test_one_choices_error_ends_all_and_every_stream_closes():
    async def run():
        closed: list[str] = []
        streams = [failing(), slow(closed)]
        seen = []
        try:
            async with contextlib.aclosing(merged(streams)) as items:
                async for item in items:
                    seen.append(item)
        finally:
            for stream in streams:  # what service.Generate does; it raised here before
                await stream.aclose()
        return seen, closed

    with pytest.raises(RequestFailed, match="the pipeline failed"):
        asyncio.run(run())
