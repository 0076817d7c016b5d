"""Text in and out: the `tokenizers` tokenizer, the chat template (rendered in jinja2's
sandbox, as the template is data from a model file), and UTF-8-safe streaming."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mtpd.model.config import ModelConfig
from mtpd.model.errors import InputError, check_unicode

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
        # Special tokens spelled out in a message's content are text, not control: a user
        # must not open a system turn by typing its markup. Longest first, so a token
        # that begins another is not matched inside it.
        specials = sorted(
            (t.content for t in tok.get_added_tokens_decoder().values() if t.special),
            key=len,
            reverse=True,
        )
        self._special_markup = re.compile("|".join(map(re.escape, specials))) if specials else None
        # A special token could also form across a content's edge: from a fragment of it
        # typed at the end of one message and the text after it (another message's, or
        # the template's), or at the start of one. Such edge fragments are hidden too.
        self._heads = {s[:k] for s in specials for k in range(1, len(s))}
        self._tails = {s[k:] for s in specials for k in range(1, len(s))}
        self._fragment_len = max(map(len, specials), default=1) - 1
        self._as_text: tokenizers.Tokenizer | None = None  # made on first need
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
        check_unicode(text, "text")
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_as_text(self, text: str) -> list[int]:
        """Special-token markup spelled out as the text it is."""
        if self._as_text is None:  # a copy: the setting is the tokenizer's, shared by threads
            as_text = tokenizers.Tokenizer.from_str(self._tok.to_str())
            as_text.encode_special_tokens = True
            self._as_text = as_text  # only once set: another thread may use it at once
        return self._as_text.encode(text, add_special_tokens=False).ids

    def _hidden(self, content: str, hide: Callable[[str], str]) -> str:
        """`content` with each special token it spells, and each fragment of one at its
        edges, replaced by `hide(text)`."""
        assert self._special_markup is not None
        content = self._special_markup.sub(lambda m: hide(m.group()), content)
        longest = min(len(content), self._fragment_len)
        head = next((k for k in range(longest, 0, -1) if content[:k] in self._tails), 0)
        longest = min(len(content) - head, self._fragment_len)
        tail = next((k for k in range(longest, 0, -1) if content[-k:] in self._heads), 0)
        middle = content[head : len(content) - tail]
        return (
            (hide(content[:head]) if head else "")
            + middle
            + (hide(content[-tail:]) if tail else "")
        )

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> tuple[str, list[int]]:
        """The rendered chat and its token ids, where only the template's own markup is
        control tokens. Each special token a message's content spells is swapped for a
        placeholder no caller can guess before rendering, and encoded as text after:
        content without such markup renders and encodes exactly as `encode(render_chat())`."""
        markup, found = self._special_markup, {}
        if markup is not None:
            nonce = secrets.token_hex(16)

            def hide(text: str) -> str:
                key = f"\x00{nonce}:{len(found)}\x00"
                found[key] = text
                return key

            messages = [
                {**m, "content": self._hidden(m["content"], hide)}
                if isinstance(m.get("content"), str)
                else m
                for m in messages
            ]
        rendered = self.render_chat(messages, add_generation_prompt)
        if not found:
            return rendered, self.encode(rendered)
        # Control tokens are the template's markup; every run of text between two of them
        # (the hidden markup restored) is encoded whole, as text, as encode() would
        # encode a run without markup.
        pieces = re.split(f"(\x00{nonce}:\\d+\x00)", rendered)
        ids: list[int] = []
        run = ""
        for i, piece in enumerate(pieces):
            if i % 2:  # a placeholder (the split's capture group)
                run += found[piece]
                continue
            at = 0
            for control in markup.finditer(piece):
                run += piece[at : control.start()]
                ids += [*self._encode_as_text(run), self._tok.token_to_id(control.group())]
                run, at = "", control.end()
            run += piece[at:]
        ids += self._encode_as_text(run)
        return "".join(found.get(piece, piece) for piece in pieces), ids

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
