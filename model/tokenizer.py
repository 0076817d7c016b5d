"""Text in and out: the `tokenizers` tokenizer, the chat template (rendered in jinja2's
sandbox, as the template is data from a model file), and UTF-8-safe streaming."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mtpd.model.config import ModelConfig
from mtpd.model.errors import InputError

if TYPE_CHECKING:  # checkpoint imports torch; the daemon imports this module before it
    from mtpd.model.checkpoint import Checkpoint

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(InputError, ValueError):
    """The chat template could not render these messages; the message says why."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class Tokenizer:
    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        chat_template: str | None,
        bos_id: int | None,
        eos_ids: Sequence[int],
    ) -> None:
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(chat_template)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, cfg: ModelConfig) -> Tokenizer:
        return cls(ckpt.tokenizer(), ckpt.chat_template, cfg.bos_token_id, cfg.eos_token_ids)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        # Special-token markup in the text (from a rendered template) is honoured.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; send a raw prompt instead")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise ChatTemplateError(
                    f"messages[{i}].role: unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})"
                )
        special = {}
        for name, tid in (
            ("bos_token", self.bos_id),
            ("eos_token", min(self.eos_ids, default=None)),
        ):
            special[name] = (self.token(tid) or "") if tid is not None else ""
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **special
            )
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e


_MAX_WINDOW = 32  # tokens a text-less run may add to the window before it moves on


class IncrementalDecoder:
    """Turns a growing token list into text deltas, never emitting half a character:
    a token may end inside a multi-byte UTF-8 sequence, which decodes to U+FFFD until
    the next token completes it. Each push decodes only a window of recent tokens (the
    ones since the last delta, after those of the delta before, whose text gives the
    context a decoder needs for spacing), so a long generation costs linear time."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # tokens before this have been returned as text

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        seen, text = self._window()
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        if len(text) <= len(seen):
            # No text (special tokens): step past them, keeping the window's context
            # for the next token's spacing while the window stays short.
            self._read = len(self._ids)
            if self._read - self._prefix > _MAX_WINDOW:
                self._prefix = self._read
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen) :]

    def flush(self) -> str:
        """What the tokens not yet returned decode to, even if it ends mid-character."""
        seen, text = self._window()
        self._prefix = self._read = len(self._ids)
        return text[len(seen) :]

    def _window(self) -> tuple[str, str]:
        """The window's text before the unreturned tokens, and with them."""
        decode, window = self._tokenizer.decode, self._ids[self._prefix :]
        return decode(window[: self._read - self._prefix]), decode(window)
