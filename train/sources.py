"""Training requests made from real text this machine's Debian packages install: the
documentation of Python, PostgreSQL and git for training, Debian's handbook and
reference held out (a split by source, never by line, so a held-out score measures
text the head never saw the like of). Passages are read out of the packages' HTML and
turned into chat requests of many kinds: explain, summarise, continue, answer, list,
translate; for code, explain, comment, rewrite and fix (with one bracket removed).

    mtpd train-data --out DIR     (then: mtpd train-mtp --prompts DIR/train.jsonl ...)
"""

from __future__ import annotations

import html.parser
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpd.model.errors import ModelLoadError


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # the Debian package that installs it
    licence: str
    root: Path  # its HTML
    pattern: str = "**/*.html"


SOURCES = {
    s.name: s
    for s in (
        Source("python", "python3.11-doc", "PSF-2.0", Path("/usr/share/doc/python3.11/html")),
        Source(
            "postgresql",
            "postgresql-doc-15",
            "PostgreSQL",
            Path("/usr/share/doc/postgresql-doc-15/html"),
        ),
        Source("git", "git-doc", "GPL-2.0-only", Path("/usr/share/doc/git-doc")),
        Source(
            "debian-handbook",
            "debian-handbook",
            "GPL-2.0-or-later or CC-BY-SA-3.0",
            Path("/usr/share/doc/debian-handbook/html/en-US"),
        ),
        Source(
            "debian-reference",
            "debian-reference-en",
            "GPL-2.0-or-later",
            Path("/usr/share/debian-reference"),
            "*.en.html",
        ),
    )
}
TRAINING = ("python", "postgresql", "git")
HELD_OUT = ("debian-handbook", "debian-reference")

_TEXT_TAGS = {"p", "li", "dd"}
_SKIPPED_TAGS = {"script", "style", "nav", "head"}
_PROSE_CHARS = (160, 1200)  # a passage shorter says too little, longer floods the context
_CODE_CHARS = (60, 900)
LANGUAGES = ("French", "Spanish", "German", "Italian")


class _Blocks(html.parser.HTMLParser):
    """A page's prose blocks (paragraphs, list items, definitions) and code blocks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.prose: list[str] = []
        self.code: list[str] = []
        self._open: list[tuple[str, list[str]]] = []  # (tag, text parts) being read
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping += 1
        elif tag in _TEXT_TAGS or tag == "pre":
            self._open.append((tag, []))

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping = max(0, self._skipping - 1)
        elif self._open and self._open[-1][0] == tag:
            _, parts = self._open.pop()
            text = "".join(parts)
            if tag == "pre":
                self.code.append(text.strip("\n"))
            else:
                self.prose.append(" ".join(text.split()))
            if self._open:  # a block inside another is part of its text too
                self._open[-1][1].append(text)

    def handle_data(self, data: str) -> None:
        if self._open and not self._skipping:
            self._open[-1][1].append(data)


def passages(source: Source) -> Iterator[tuple[str, str]]:
    """("prose" | "code", text) for every passage of fitting length, page by page."""
    if not source.root.is_dir():
        raise ModelLoadError(
            f"{source.root}: not found; install it with `apt-get install {source.package}`"
        )
    for page in sorted(source.root.glob(source.pattern)):
        blocks = _Blocks()
        blocks.feed(page.read_text(errors="replace"))
        for text in blocks.prose:
            if _PROSE_CHARS[0] <= len(text) <= _PROSE_CHARS[1]:
                yield "prose", text
        for text in blocks.code:
            if _CODE_CHARS[0] <= len(text) <= _CODE_CHARS[1]:
                yield "code", text


def _broken(code: str) -> str | None:
    """The code with its last closing bracket removed (a bug to fix), if it has one."""
    at = max(code.rfind(c) for c in ")]}")
    return None if at < 0 else code[:at] + code[at + 1 :]


def request(kind: str, text: str, rng: random.Random) -> str:
    """One chat request about a passage, of a kind drawn with `rng`."""
    if kind == "code":
        fenced = f"```\n{text}\n```"
        broken = _broken(text)
        asks = [
            f"What does this code do?\n\n{fenced}",
            f"Add comments to this code that explain each step:\n\n{fenced}",
            f"Rewrite this code to be easier to read:\n\n{fenced}",
        ]
        if broken is not None:
            asks.append(f"This code has a bug. Find it and fix it:\n\n```\n{broken}\n```")
        return rng.choice(asks)
    half = text[: len(text) // 2].rsplit(" ", 1)[0]
    asks = [
        f"Explain the following in simple terms:\n\n{text}",
        f"Summarise this in two sentences:\n\n{text}",
        f"Continue this text:\n\n{half}",
        f"Read this, then say what it is about and why it matters:\n\n{text}",
        f"List the key points of this passage:\n\n{text}",
        f"Translate this into {rng.choice(LANGUAGES)}:\n\n{text}",
    ]
    return rng.choice(asks)


def requests(names: Sequence[str], per_source: int, seed: int) -> list[str]:
    """`per_source` requests from each named source: passages drawn evenly over it."""
    out = []
    for name in names:
        found = list(dict.fromkeys(passages(SOURCES[name])))  # a passage once
        rng = random.Random(f"{seed}:{name}")
        picked = rng.sample(found, min(per_source, len(found)))
        out += [request(kind, text, rng) for kind, text in picked]
    random.Random(seed).shuffle(out)
    return out


def write_requests(path: Path, prompts: Sequence[str]) -> None:
    """One JSON string a line: requests span lines."""
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))


def read_requests(path: Path) -> list[str]:
    """A prompts file: JSON lines (.jsonl, one string each) or plain lines."""
    if not path.exists():
        raise ModelLoadError(f"{path}: prompts file not found")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [line.strip() for line in lines]
    prompts = []
    for i, line in enumerate(lines, 1):
        value = json.loads(line)
        if not isinstance(value, str):
            raise ModelLoadError(f"{path}:{i}: a JSON string expected")
        prompts.append(value)
    return prompts


def make(out: Path, per_source: int, held_out: int, seed: int) -> dict:
    """train.jsonl from the training sources, held-out.jsonl from the held-out ones, and
    sources.json saying which packages and licences they came from."""
    out.mkdir(parents=True, exist_ok=True)
    train = requests(TRAINING, per_source, seed)
    kept_out = requests(HELD_OUT, held_out, seed)
    write_requests(out / "train.jsonl", train)
    write_requests(out / "held-out.jsonl", kept_out)
    summary = {
        "seed": seed,
        "train": {"requests": len(train), "sources": _described(TRAINING)},
        "held_out": {"requests": len(kept_out), "sources": _described(HELD_OUT)},
    }
    (out / "sources.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _described(names: Sequence[str]) -> list[dict[str, str]]:
    return [
        {"name": n, "package": SOURCES[n].package, "licence": SOURCES[n].licence} for n in names
    ]
