"""What the sync and async clients share: building requests from Python values, and
assembling the streamed chunks into deltas and a result."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import grpc

from mtpd.address import client_address
from mtpd.v1 import inference_pb2 as api

# A chat message: {"role": ..., "content": ...} or (role, content).
Message = Mapping[str, str] | tuple[str, str]

_FINISH = {api.FINISH_REASON_STOP: "stop", api.FINISH_REASON_LENGTH: "length"}


class Options(TypedDict, total=False):
    """Generation options; an absent one takes the server's default (see
    GenerationOptions in protos/mtpd/v1/inference.proto, or `mtpd info`)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int
    stop: str | Sequence[str]
    draft_tokens: int
    ignore_eos: bool


def generation_options(options: Options) -> api.GenerationOptions:
    values = {k: v for k, v in options.items() if v is not None}
    if isinstance(values.get("stop"), str):  # one stop sequence, not one per character
        values["stop"] = [values["stop"]]
    try:
        return api.GenerationOptions(**values)
    except ValueError as e:  # an unknown option
        raise TypeError(str(e)) from None


def generate_request(
    prompt: str | Sequence[int], request_id: str | None, options: Options
) -> api.GenerateRequest:
    """A text prompt, or token ids."""
    request = api.GenerateRequest(options=generation_options(options), request_id=request_id or "")
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, bytes | bytearray):
        raise TypeError("the prompt is text (str) or token ids, not bytes")
    else:
        request.prompt_token_ids.extend(prompt)
    return request


def chat_messages(messages: Sequence[Message]) -> list[api.ChatMessage]:
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        out.append(api.ChatMessage(role=role, content=content))
    return out


def chat_request(
    messages: Sequence[Message], request_id: str | None, options: Options
) -> api.ChatRequest:
    return api.ChatRequest(
        messages=chat_messages(messages),
        options=generation_options(options),
        request_id=request_id or "",
    )


@dataclass(frozen=True)
class Delta:
    """New text from one step, with the tokens the step accepted."""

    text: str
    token_ids: list[int]
    accepted_drafts: int  # of token_ids, MTP drafts that verification accepted


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (end of sequence or a stop sequence) or "length"
    stop_sequence: str | None = None
    request_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accepted_drafts: int = 0
    timing: api.Timing = field(default_factory=api.Timing)
    drafts: api.DraftSummary = field(default_factory=api.DraftSummary)

    def add(self, chunk: api.GenerateChunk) -> Delta | None:
        """Take one streamed chunk; returns the delta it carries, if any."""
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.accepted_drafts += chunk.accepted_drafts
        self.request_id = chunk.request_id
        if chunk.finish_reason:
            self.finish_reason = _FINISH.get(chunk.finish_reason, "unknown")
            self.stop_sequence = chunk.stop_sequence or None
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens
            self.timing, self.drafts = chunk.timing, chunk.drafts
        if chunk.text or chunk.token_ids:
            return Delta(chunk.text, list(chunk.token_ids), chunk.accepted_drafts)
        return None

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)


TOKEN_ENV = "MTPD_API_TOKEN"


TLS_CA_ENV = "MTPD_TLS_CA"


class CallSettings:
    """What both clients hold: the address, the default deadline, the token, and the
    TLS credentials for a TCP address (None: plaintext)."""

    def __init__(
        self,
        address: str | None,
        token: str | None,
        timeout: float | None,
        tls_ca: str | None,
    ) -> None:
        self.address = client_address(address)
        self.timeout = timeout
        token = token or os.environ.get(TOKEN_ENV)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._tls: grpc.ChannelCredentials | None = None
        ca = tls_ca or os.environ.get(TLS_CA_ENV)
        if ca and not self.address.startswith("unix:"):
            self._tls = grpc.ssl_channel_credentials(Path(ca).read_bytes())

    def _call(self, timeout: float | None) -> dict:
        """Keyword arguments of a stub call."""
        return {"timeout": timeout or self.timeout, "metadata": self._metadata}
