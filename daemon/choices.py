"""A request's n choices (both APIs): choice i samples with seed + i, all are admitted or
none, and their chunks stream merged as they come."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

from mtpd.daemon.frontend import Frontend
from mtpd.daemon.generation import Prompt, RequestId
from mtpd.daemon.options import GenerationOptions
from mtpd.daemon.request import Request
from mtpd.model.errors import InvalidParameter
from mtpd.model.sampling_params import MAX_SEED
from mtpd.v1 import inference_pb2 as api

T = TypeVar("T")


def choice_streams(
    front: Frontend,
    prompt: Prompt,
    options: GenerationOptions,
    request_id: RequestId,
    arrived: float | None = None,
    on_admitted: Callable[[Request], None] | None = None,
    prompt_field: str = "prompt",
) -> list[AsyncIterator[api.GenerateChunk]]:
    """One generation per choice: choice i draws with seed + i, with its own reader of a
    chat's reply (a reader keeps its reply's state). Choice i's request id is
    `request_id.i` when there are several (RequestId.choice)."""
    n = options.n
    max_seqs = front.ready().pipeline.max_seqs
    if n > max_seqs:
        raise InvalidParameter(
            f"n: at most {max_seqs}, the sequences decoded together (mtpd serve --max-seqs)",
            "n",
        )
    arrived = time.monotonic() if arrived is None else arrived
    streams = []
    for i in range(n):
        reader = prompt.reply if i == 0 or prompt.reply is None else prompt.reply.fresh()
        choice = dataclasses.replace(prompt, reply=reader)
        seeded = dataclasses.replace(options, seed=(options.seed + i) % (MAX_SEED + 1))
        streams.append(
            front.generate(
                choice,
                seeded,
                request_id if n == 1 else request_id.choice(i),
                arrived,
                on_admitted,
                prompt_field,
                i,
            )
        )
    return streams


async def all_or_none(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Every result, or the first error with the others cancelled and awaited: a choice
    refused (a full queue) or failed must not leave the others running, and the streams
    they read can only be closed once nothing awaits them."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of every stream as they come; one stream's error ends them all. One stream
    is its own merge: a request of one choice is read with no generator in between."""
    return streams[0] if len(streams) == 1 else _merged(streams)


async def _merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    done = object()

    async def pump(stream: AsyncIterator[T]) -> None:
        # Cancelled only by the reader's leaving (below): then no one waits for an end.
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put(item)
        except Exception as e:
            await queue.put(e)
        else:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        running = len(streams)
        while running:
            item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        # Awaited, so the streams they read are closed, not still running, when the
        # caller closes them in turn (an aclose then raised and hid the error).
        await asyncio.gather(*tasks, return_exceptions=True)
