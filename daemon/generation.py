"""One request's way from the tokens the scheduler accepts to the chunks its caller
receives: UTF-8-safe text, exact stop sequences, usage and timing. Every API, and
`mtpd run`, starts a request with `start()` (through `Frontend.generate`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mtpd.daemon.assistant_output import AssistantOutput, partial_end
from mtpd.daemon.coordinator import Coordinator
from mtpd.daemon.draft_policy import DraftStats
from mtpd.daemon.options import GenerationOptions, OutputFormat, check_prompt_ids
from mtpd.daemon.request import Accepted, Request, RequestFailed
from mtpd.model.tokenizer import IncrementalDecoder, Tokenizer
from mtpd.v1 import inference_pb2 as api

_FINISH = {
    "stop": api.FINISH_REASON_STOP,
    "length": api.FINISH_REASON_LENGTH,
    "tool_calls": api.FINISH_REASON_TOOL_CALLS,
}
FINISH_NAMES = {code: name for name, code in _FINISH.items()}


@dataclass(frozen=True)
class RequestId:
    """A request's two names: the daemon's own (`own`, unique: in the log, the
    scheduler and the workers' sequence) and the one its chunks carry (`caller`: the
    request_id the caller sent, else the daemon's)."""

    own: str
    caller: str

    def choice(self, i: int) -> RequestId:
        """Choice i's, of a request with several."""
        return RequestId(f"{self.own}.{i}", f"{self.caller}.{i}")

    def __str__(self) -> str:
        return self.own if self.own == self.caller else f"{self.own} ({self.caller!r})"


@dataclass(frozen=True)
class Prompt:
    """What a request generates from: its token ids, for a chat the reader that splits
    its reply into content, reasoning and tool calls, and the format a forced tool call
    constrains the reply to."""

    ids: list[int]
    reply: AssistantOutput | None = None
    output_format: OutputFormat | None = None


class StopMatcher:
    """Finds the first stop sequence in streamed text. Text that could be the start of
    one is held back until the next text shows it is not, so a stop sequence split
    across steps is found, and nothing of it is ever streamed."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = list(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to stream, the stop sequence found or None). After a stop
        sequence, the text before it is all that is returned."""
        text = self._held + text
        hits = [(i, stop) for stop in self._stops if (i := text.find(stop)) >= 0]
        if hits:
            i, stop = min(hits)
            self._held = ""
            return text[:i], stop
        hold = max((partial_end(stop, text) for stop in self._stops), default=0)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], None

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text


class Generation:
    """Turns a request's accepted steps into GenerateChunks."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        request: Request,
        prompt_tokens: int,
        options: GenerationOptions,
        request_id: str,
        draft_policy: str,
        arrived_at: float,
        reply: AssistantOutput | None = None,
        choice: int = 0,
    ) -> None:
        self.request, self.request_id, self.choice = request, request_id, choice
        self._reply = reply
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = StopMatcher(options.stop)
        self._prompt_tokens, self._draft_policy = prompt_tokens, draft_policy
        self._arrived_at = arrived_at
        self._first_token_at: float | None = None
        self.completion_tokens = 0
        self.stop_sequence: str | None = None

    @property
    def stopped(self) -> bool:
        """A stop sequence ended the generation (the request itself may still run)."""
        return self.stop_sequence is not None

    def chunk(self, step: Accepted) -> api.GenerateChunk:
        texts, kept = [], []
        # Token by token, so the token that completes a stop sequence is known.
        for token in step.token_ids:
            kept.append(token)
            text, self.stop_sequence = self._stops.feed(self._decoder.push([token]))
            texts.append(text)
            if self.stopped:
                break
        self.completion_tokens += len(kept)
        self._first_token_at = self._first_token_at or time.monotonic()
        return api.GenerateChunk(
            **self._split("".join(texts)),
            token_ids=kept,
            logprobs=[
                api.TokenLogprob(
                    token_id=token,
                    logprob=entry.logprob,
                    top_token_ids=entry.top_ids,
                    top_logprobs=entry.top_logprobs,
                )
                for token, entry in zip(kept, step.logprobs, strict=False)
            ],
            accepted_drafts=min(step.drafts, len(kept)),
            request_id=self.request_id,
            choice=self.choice,
        )

    def last_chunk(self) -> api.GenerateChunk:
        text = ""
        if not self.stopped:  # the end may complete a character, or a stop sequence
            text, self.stop_sequence = self._stops.feed(self._decoder.flush())
            if not self.stopped:
                text += self._stops.flush()
        reason = "stop" if self.stopped else self.request.finish_reason
        if reason not in _FINISH:
            raise RequestFailed(f"request {self.request_id} ended: {reason}")
        split = self._split(text, last=True)
        if reason == "stop" and self._reply is not None and self._reply.tool_calls:
            reason = "tool_calls"
        return api.GenerateChunk(
            **split,
            request_id=self.request_id,
            choice=self.choice,
            finish_reason=_FINISH[reason],
            stop_sequence=self.stop_sequence or "",
            usage=api.Usage(
                prompt_tokens=self._prompt_tokens,
                completion_tokens=self.completion_tokens,
                cached_tokens=self.request.cached_tokens,
            ),
            timing=self._timing(),
            drafts=draft_summary(self.request.drafts, self._draft_policy),
        )

    def _split(self, text: str, last: bool = False) -> dict[str, Any]:
        """A chunk's text fields: all of it as `text`, or for a chat the reply's content,
        reasoning and completed tool calls."""
        if self._reply is None:
            return {"text": text}
        delta = self._reply.feed(text)
        if last:
            delta += self._reply.finish()
        return {
            "text": delta.content,
            "reasoning_text": delta.reasoning,
            "tool_calls": [
                api.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in delta.tool_calls
            ],
        }

    def _timing(self) -> api.Timing:
        now, request = time.monotonic(), self.request
        elapsed = now - self._arrived_at
        first = self._first_token_at or now
        n = self.completion_tokens
        return api.Timing(
            queued_s=(request.admitted_at or now) - request.submitted_at,
            time_to_first_token_s=first - self._arrived_at,
            elapsed_s=elapsed,
            tokens_per_s=n / elapsed if elapsed > 0 else 0.0,
            decode_tokens_per_s=(n - 1) / (now - first) if n > 1 and now > first else 0.0,
            verify_s=request.drafts.verify_s,
            draft_s=request.drafts.draft_s,
            transport_s=request.drafts.transport_s,
        )


def draft_summary(stats: DraftStats, draft_policy: str) -> api.DraftSummary:
    return api.DraftSummary(
        draft_policy=draft_policy,
        steps=stats.steps,
        drafted=sum(stats.drafted),
        accepted=sum(stats.accepted),
        acceptance_by_position=stats.acceptance_by_position,
        tokens_per_step=stats.tokens_per_step,
    )


def draft_policy_name(daemon: Coordinator, override: int | None = None) -> str:
    policy = daemon.scheduler.policy
    if not policy.enabled:
        return "0"
    return str(override if override is not None else policy.setting)


async def start(
    daemon: Coordinator,
    prompt: Prompt,
    options: GenerationOptions,
    request_id: RequestId,
    arrived_at: float,
    prompt_field: str = "prompt_token_ids",
    choice: int = 0,
) -> Generation:
    """Submit a request to the scheduler; its accepted steps become chunks through the
    Generation returned. `prompt_field` is what the caller's API calls the prompt, for
    errors about its token ids; `choice`, which of the request's n choices this is."""
    prompt_ids = prompt.ids
    check_prompt_ids(prompt_ids, daemon.cfg.vocab_size, prompt_field)
    sampling = options.sampling()
    sampling.check_vocab(daemon.cfg.vocab_size)
    output_format = options.structured_output or prompt.output_format
    constraint = None
    if output_format is not None:  # compiling may take a while: off the event loop
        constraint = await asyncio.to_thread(daemon.grammars.matcher, output_format)
    request = daemon.scheduler.submit(
        prompt_ids,
        sampling,
        options.max_tokens_for(len(prompt_ids), daemon.pipeline.max_context),
        ignore_eos=options.ignore_eos,
        draft_tokens=options.draft_tokens,
        top_logprobs=options.top_logprobs if options.logprobs else None,
        constraint=constraint,
        request_id=request_id.own,
    )
    return Generation(
        daemon.tokenizer,
        request,
        len(prompt_ids),
        options,
        request_id.caller,
        draft_policy_name(daemon, options.draft_tokens),
        arrived_at,
        prompt.reply,
        choice,
    )
