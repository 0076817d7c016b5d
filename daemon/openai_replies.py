"""A generation's chunks as OpenAI's responses: one choice's message or events (content,
reasoning, tool calls, log-probabilities), n choices merged as they come, the usage."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from mtpd import __version__
from mtpd.daemon.choices import all_or_none, merged
from mtpd.daemon.generation import FINISH_NAMES
from mtpd.daemon.openai_bodies import ChatCompletionRequest, SamplingBody
from mtpd.daemon.openai_errors import api_error
from mtpd.model.tokenizer import Tokenizer
from mtpd.v1 import inference_pb2 as api


def sse_event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage_of(lasts: list[api.GenerateChunk]) -> dict:
    """The choices' last chunks' usage: the prompt once, the completions summed, and
    mtpd's draft statistics of the first choice."""
    u, d, t = lasts[0].usage, lasts[0].drafts, lasts[0].timing
    completion = sum(last.usage.completion_tokens for last in lasts)
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": u.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        # mtpd's extension: how speculative decoding went for this request.
        "mtpd": {
            "draft_policy": d.draft_policy,
            "steps": d.steps,
            "drafted": d.drafted,
            "accepted": d.accepted,
            "acceptance_by_position": list(d.acceptance_by_position),
            "tokens_per_step": d.tokens_per_step,
            "time_to_first_token_s": t.time_to_first_token_s,
            "decode_tokens_per_s": t.decode_tokens_per_s,
        },
    }


class Reply:
    """One generation's chunks as an OpenAI response: a whole object or its events."""

    def __init__(
        self, request_id: str, model: str, body: SamplingBody, tokenizer: Tokenizer, index: int
    ) -> None:
        self.tokenizer, self.index = tokenizer, index
        self._generated = b""  # the completions API's text so far, for text_offset
        self.chat = isinstance(body, ChatCompletionRequest)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.model, self.created = model, int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def _envelope(self, choices: list[dict], streaming: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if streaming and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"mtpd-{__version__}",
            "choices": choices,
        }

    def _choice(self, text: str | None, finish: str | None, streaming: bool) -> dict:
        choice: dict[str, Any] = {"index": self.index}
        if self.chat and streaming:
            choice["delta"] = {} if text is None else {"content": text}
        elif self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        return choice

    def _logprobs(self, logprobs: Sequence[api.TokenLogprob]) -> dict | None:
        """Chat's `{"content": [...]}` or the completions API's parallel lists. A token's
        text is its own decoding (a piece of a character decodes to U+FFFD; its bytes
        then are those of that text)."""
        if not logprobs:
            return None
        text = self._token_text
        if self.chat:
            return {
                "content": [
                    {
                        **self._token_entry(e.token_id, e.logprob),
                        "top_logprobs": [
                            self._token_entry(t, lp)
                            for t, lp in zip(e.top_token_ids, e.top_logprobs, strict=True)
                        ],
                    }
                    for e in logprobs
                ]
            }
        tokens = [text(e.token_id) for e in logprobs]
        offsets = []
        for e in logprobs:  # where each token's text begins: whole characters before it
            offsets.append(len(self._generated.decode(errors="ignore")))
            self._generated += self.tokenizer.token_bytes(e.token_id)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in logprobs],
            "top_logprobs": [
                {text(t): lp for t, lp in zip(e.top_token_ids, e.top_logprobs, strict=True)}
                for e in logprobs
            ],
            "text_offset": offsets,
        }

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode(errors="replace")

    def _token_entry(self, token_id: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token_id)
        return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

    @staticmethod
    def _calls(calls: list[api.ToolCall], first_index: int = 0, streaming: bool = False) -> list:
        """Calls as OpenAI sends them: a streamed call whole in one delta, at its index."""
        return [
            {
                **({"index": first_index + i} if streaming else {}),
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for i, c in enumerate(calls)
        ]

    async def collect(
        self, first: api.GenerateChunk, rest: AsyncIterator[api.GenerateChunk]
    ) -> tuple[dict, api.GenerateChunk]:
        """This choice, whole, and its last chunk (for the usage)."""
        chunks = [first]
        async with contextlib.aclosing(rest):
            while not chunks[-1].finish_reason:
                chunks.append(await anext(rest))
        last = chunks[-1]
        text = "".join(c.text for c in chunks)
        calls = [call for c in chunks for call in c.tool_calls]
        reasoning = "".join(c.reasoning_text for c in chunks)
        choice = self._choice(
            text or None if calls else text, FINISH_NAMES[last.finish_reason], False
        )
        if self.chat and reasoning:
            choice["message"]["reasoning_content"] = reasoning
        if self.chat and calls:
            choice["message"]["tool_calls"] = self._calls(calls)
        choice["logprobs"] = self._logprobs([e for c in chunks for e in c.logprobs])
        return choice, last

    async def choice_events(
        self, first: api.GenerateChunk, rest: AsyncIterator[api.GenerateChunk]
    ) -> AsyncIterator[bytes | tuple[int, api.GenerateChunk]]:
        """This choice's events, then (its index, its last chunk) for the usage."""

        def event(choice: dict) -> bytes:
            out = self._envelope([choice], True)
            if self.include_usage:
                out["usage"] = None
            return sse_event(out)

        if self.chat:  # the role first, as OpenAI sends it
            opening = self._choice("", None, streaming=True)
            opening["delta"]["role"] = "assistant"
            yield event(opening)
        calls = 0
        async with contextlib.aclosing(rest):
            chunk = first
            while True:
                if chunk.reasoning_text:
                    reasoning = self._choice(None, None, streaming=True)
                    reasoning["delta"]["reasoning_content"] = chunk.reasoning_text
                    yield event(reasoning)
                if chunk.text or chunk.logprobs:
                    content = self._choice(chunk.text, None, streaming=True)
                    content["logprobs"] = self._logprobs(chunk.logprobs)
                    yield event(content)
                if chunk.tool_calls:
                    called = self._choice(None, None, streaming=True)
                    called["delta"]["tool_calls"] = self._calls(
                        list(chunk.tool_calls), calls, streaming=True
                    )
                    calls += len(chunk.tool_calls)
                    yield event(called)
                if chunk.finish_reason:
                    break
                chunk = await anext(rest)
        yield event(self._choice(None, FINISH_NAMES[chunk.finish_reason], streaming=True))
        yield self.index, chunk


async def whole(
    replies: list[Reply],
    firsts: list[api.GenerateChunk],
    rests: list[AsyncIterator[api.GenerateChunk]],
) -> dict:
    """The choices, each read to its end, as one response with the usage."""
    result = await all_or_none(
        r.collect(f, rest) for r, f, rest in zip(replies, firsts, rests, strict=True)
    )
    out = replies[0]._envelope([choice for choice, _ in result], False)
    out["usage"] = usage_of([last for _, last in result])
    return out


async def events(
    replies: list[Reply],
    firsts: list[api.GenerateChunk],
    rests: list[AsyncIterator[api.GenerateChunk]],
) -> AsyncIterator[bytes]:
    """The choices' events as they come (interleaved, each at its index), then the usage
    and [DONE]. An error mid-generation is said, then the stream ends."""
    lasts: list[tuple[int, api.GenerateChunk]] = []  # (choice, its last chunk)
    together = merged(
        [r.choice_events(f, rest) for r, f, rest in zip(replies, firsts, rests, strict=True)]
    )
    try:
        async with contextlib.aclosing(together):
            async for item in together:
                if isinstance(item, bytes):
                    yield item
                else:
                    lasts.append(item)
    except Exception as e:  # the pipeline failed mid-generation: say so, then end
        yield sse_event(api_error(e).body())
        yield sse_event("[DONE]")
        return
    if replies[0].include_usage:
        final = replies[0]._envelope([], True)
        final["usage"] = usage_of([chunk for _, chunk in sorted(lasts)])  # choice 0 first
        yield sse_event(final)
    yield sse_event("[DONE]")
