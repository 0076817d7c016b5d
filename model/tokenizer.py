"""Text in and out: the `tokenizers` tokenizer, the chat template (rendered in jinja2's
sandbox, as the template is data from a model file), and UTF-8-safe streaming."""

from __future__ import annotations

import functools
import json
import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tokenizers

from mtpd.model.chat_template import ChatTemplateError, ChatTemplates
from mtpd.model.config import ModelConfig
from mtpd.model.errors import InputError, check_unicode

if TYPE_CHECKING:  # checkpoint imports torch; the daemon imports this module before it
    from mtpd.model.checkpoint import Checkpoint

ROLES = ("system", "user", "assistant", "tool")
# GPT-2's byte-level alphabet (tokenizers' ByteLevel), read back: a printable character
# for each byte, the printable bytes as themselves.
_PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]
_BYTE_OF = {
    chr(c): b
    for b, c in zip(
        _PRINTABLE + [b for b in range(256) if b not in _PRINTABLE],
        _PRINTABLE + [256 + i for i in range(256 - len(_PRINTABLE))],
        strict=True,
    )
}
# A placeholder's ends: private-use characters, which JSON (and so `tojson`) keeps as they are.
_OPEN, _CLOSE = "\ue000", "\ue001"


@dataclass(frozen=True)
class _Respelled:
    tokenizer: tokenizers.Tokenizer
    spelling: dict[str, str]  # an added token's content -> its spelling in `tokenizer`
    ids: dict[int, int]  # its id there -> its id in the model's tokenizer


class Tokenizer:
    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        chat_template: str | Mapping[str, str] | None,
        bos_id: int | None,
        eos_ids: Sequence[int],
    ) -> None:
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # Added tokens spelled out in a message's content are text, not control: a user
        # must not open a system turn (or a tool's answer) by typing its markup. Longest
        # first, so a token that begins another is not matched inside it.
        added = sorted({t.content for t in tok.get_added_tokens_decoder().values()}, key=len)[::-1]
        self._markup = re.compile("|".join(map(re.escape, added))) if added else None
        # One could also form across a content's edge, from a fragment of it typed at the
        # end of one message and the text after it (another message's, or the
        # template's), or at the start of one. Such edge fragments are hidden too.
        self._heads = {s[:k] for s in added for k in range(1, len(s))}
        self._tails = {s[k:] for s in added for k in range(1, len(s))}
        self._fragment_len = max(map(len, added), default=1) - 1
        self._respelled: _Respelled | None = None  # made on first need
        self._added = set(added)
        # Control tokens (end of turn...), as opposed to added tokens that are text.
        self.control_ids = frozenset(
            i for i, t in tok.get_added_tokens_decoder().items() if t.special
        )
        self._bytes: dict[int, bytes] = {}  # token_bytes, as asked for
        self._as_text: tokenizers.Tokenizer | None = None  # made on first need
        self._lock = threading.Lock()
        self.templates = ChatTemplates(chat_template) if chat_template else None

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, cfg: ModelConfig) -> Tokenizer:
        return cls(ckpt.tokenizer(), ckpt.chat_template, cfg.bos_token_id, cfg.eos_token_ids)

    @property
    def has_chat_template(self) -> bool:
        return self.templates is not None

    def token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a piece of a character, for some): what OpenAI's
        logprobs report, and what decoding it alone (to U+FFFD) would lose."""
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._raw_bytes(token_id)
        return cached

    @functools.cached_property
    def _byte_level(self) -> bool:
        """Whether tokens are GPT-2's byte-level strings. Read on first need: the
        tokenizer's JSON takes ~50 ms to parse, which every start would pay."""
        return '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get("decoder"))

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if not self._byte_level and (byte := re.fullmatch(r"<0x([0-9A-F]{2})>", piece)):
            return bytes([int(byte.group(1), 16)])  # sentencepiece's byte fallback
        if piece in self._added:  # added tokens are stored as their text
            return piece.encode()
        if self._byte_level:
            return bytes(_BYTE_OF.get(c, 0) for c in piece)
        return piece.replace("\u2581", " ").encode()  # sentencepiece's word marker

    def encode(self, text: str) -> list[int]:
        # Special-token markup in the text (from a rendered template) is honoured.
        check_unicode(text, "text")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_as_text(self, text: str) -> list[int]:
        """The ids of `text` with control-token markup in it encoded as the text it
        spells (a grammar's literal "<|im_end|>" is text, not the end of a turn)."""
        with self._lock:
            if self._as_text is None:
                self._as_text = tokenizers.Tokenizer.from_str(self._tok.to_str())
                self._as_text.encode_special_tokens = True
        return self._as_text.encode(text, add_special_tokens=False).ids

    def markup_in(self, text: str) -> str | None:
        """The first added token (control markup) `text` spells, or None."""
        found = self._markup.search(text) if self._markup is not None else None
        return found.group() if found else None

    def _hidden(self, content: str, hide: Callable[[str], str]) -> str:
        """`content` with each added token it spells, and each fragment of one at its
        edges, replaced by `hide(text)`."""
        assert self._markup is not None
        content = self._markup.sub(lambda m: hide(m.group()), content)
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
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[str, list[int]]:
        """The rendered chat and its token ids, where only the template's own markup is
        control tokens. Markup that any caller's string spells (a message's content or
        reasoning, a call's arguments, a tool's schema, a template keyword) is swapped
        for a placeholder no caller can guess before rendering, and restored after as
        text: the template's markup is respelled for a tokenizer that knows only the
        respelled forms, so one encode splits the text exactly where `encode` would.
        The placeholders are JSON-safe (private-use delimiters), so they survive a
        template's `tojson`. A chat without markup encodes exactly as
        `encode(render_chat())`."""
        markup, found = self._markup, {}
        if markup is not None:
            nonce = secrets.token_hex(16)

            def hide(text: str) -> str:
                key = f"{_OPEN}{nonce}{len(found)}{_CLOSE}"
                found[key] = text
                return key

            def hidden(value: Any) -> Any:
                if isinstance(value, str):
                    return self._hidden(value, hide)
                if isinstance(value, Mapping):
                    for key in value:
                        if isinstance(key, str) and (token := self.markup_in(key)):
                            raise InputError(f"a key {key!r} spells the control token {token!r}")
                    return {k: v if k == "role" else hidden(v) for k, v in value.items()}
                if isinstance(value, list | tuple):
                    return [hidden(v) for v in value]
                return value

            messages = [hidden(m) for m in messages]
            tools, template_kwargs = hidden(tools), hidden(template_kwargs)
        rendered = self.render_chat(messages, add_generation_prompt, tools, template_kwargs)
        if not found:
            return rendered, self.encode(rendered)
        pieces = re.split(f"({_OPEN}{nonce}\\d+{_CLOSE})", rendered)  # odd ones: placeholders
        if any(nonce in piece.lower() for piece in pieces[::2]):
            raise ChatTemplateError(
                "this chat template rewrites message content (upper, escaping...), so the "
                "token markup in it cannot be kept as text: remove it from the messages"
            )
        respelled = self._respelled or self._respell()
        spelled = "".join(
            found[piece] if i % 2 else markup.sub(lambda m: respelled.spelling[m.group()], piece)
            for i, piece in enumerate(pieces)
        )
        ids = respelled.tokenizer.encode(spelled, add_special_tokens=False).ids
        text = "".join(found.get(piece, piece) for piece in pieces)
        return text, [respelled.ids.get(i, i) for i in ids]

    def _respell(self) -> _Respelled:
        """A copy of the tokenizer whose added tokens are spelled as strings no caller
        can guess (their options kept), with the ids they get there mapped back."""
        config = json.loads(self._tok.to_str())
        nonce = secrets.token_hex(16)
        spelling = {}
        for token in config["added_tokens"]:
            spelling[token["content"]] = token["content"] = f"\x00{nonce}:{token['id']}\x00"
        copy = tokenizers.Tokenizer.from_str(json.dumps(config))
        ids = {copy.token_to_id(s): self._tok.token_to_id(o) for o, s in spelling.items()}
        # Assigned whole and once made: another thread may use it at once.
        self._respelled = _Respelled(copy, spelling, ids)
        return self._respelled

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The chat as transformers' apply_chat_template renders it (model/chat_template.py),
        with `tools` (OpenAI's function tools) and the caller's template keywords."""
        if self.templates is None:
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
        return self.templates.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=None,
            variables={**special, **(template_kwargs or {})},
        )


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
