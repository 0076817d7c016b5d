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
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpd.model.errors import ModelLoadError


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # the Debian (12) package that installs it
    licence: str
    root: str  # its HTML's folder, "*" standing for a version (another release's)
    pattern: str = "**/*.html"

    def folder(self) -> Path | None:
        """The installed folder (the newest version's), or None."""
        version = re.compile(re.escape(self.root).replace(r"\*", r"[0-9.]+") + "$")
        found = [p for p in Path("/").glob(self.root.lstrip("/")) if version.match(str(p))]
        return max(found, key=lambda p: [int(x) for x in re.findall(r"\d+", str(p))], default=None)


SOURCES = {
    s.name: s
    for s in (
        Source("python", "python3.11-doc", "PSF-2.0", "/usr/share/doc/python3.*/html"),
        Source(
            "postgresql",
            "postgresql-doc-15",
            "PostgreSQL",
            "/usr/share/doc/postgresql-doc-*/html",
        ),
        Source("git", "git-doc", "GPL-2.0-only", "/usr/share/doc/git-doc"),
        Source(
            "debian-handbook",
            "debian-handbook",
            "GPL-2.0-or-later or CC-BY-SA-3.0",
            "/usr/share/doc/debian-handbook/html/en-US",
        ),
        Source(
            "debian-reference",
            "debian-reference-en",
            "GPL-2.0-or-later",
            "/usr/share/debian-reference",
            "*.en.html",
        ),
    )
}
TRAINING = ("python", "postgresql", "git")
HELD_OUT = ("debian-handbook", "debian-reference")

_PROSE_TAGS = {"p", "li", "dd"}  # and <div class="para"> (DocBook's paragraphs)
_SKIPPED_TAGS = {"script", "style", "nav", "head"}
_VOID_TAGS = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "wbr",
}
# Pages that are lists of titles or words, not text: indexes and tables of contents.
_SKIPPED_PAGES = ("genindex", "py-modindex", "contents.html", "bookindex", "index.html")
_PROSE_CHARS = (160, 1200)  # a passage shorter says too little, longer floods the context
_CODE_CHARS = (60, 900)
LANGUAGES = ("French", "Spanish", "German", "Italian")


class _Blocks(html.parser.HTMLParser):
    """A page's prose blocks (paragraphs, list items, definitions) and code blocks. A
    block's text is its own: a block inside it (a paragraph in a list item, code in a
    paragraph) is a passage of its own, not part of its parent's."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.prose: list[str] = []
        self.code: list[str] = []
        # Open elements that matter: (tag, its text parts, or None for one that holds no
        # passage of its own but must be matched by its end tag, or "skip").
        self._open: list[tuple[str, list[str] | str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            return  # never closed
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag in _SKIPPED_TAGS or a.get("role") == "navigation" or "sphinxsidebar" in classes:
            self._open.append((tag, "skip"))
        elif tag in _PROSE_TAGS or tag == "pre" or (tag == "div" and "para" in classes):
            self._open.append((tag, []))
        else:  # held, so that its end tag ends what it holds (an unclosed <li> in a <ul>)
            self._open.append((tag, None))

    def close(self) -> None:
        super().close()
        if self._open:  # what a page left open ends with it
            self.handle_endtag(self._open[0][0])

    def handle_endtag(self, tag: str) -> None:
        # Pop down to the element this closes: an unclosed <li> or <p> ends with it.
        at = next((i for i in range(len(self._open) - 1, -1, -1) if self._open[i][0] == tag), None)
        if at is None:
            return
        closed, self._open = self._open[at:], self._open[:at]
        for name, parts in reversed(closed):
            if isinstance(parts, list):
                text = "".join(parts)
                if name == "pre":
                    self.code.append(text.strip("\n"))
                else:
                    self.prose.append(" ".join(text.split()))

    def handle_data(self, data: str) -> None:
        if any(parts == "skip" for _, parts in self._open):
            return
        innermost = next((p for _, p in reversed(self._open) if isinstance(p, list)), None)
        if innermost is not None:
            innermost.append(data)


def missing_packages(names: Sequence[str]) -> list[str]:
    return [SOURCES[n].package for n in names if SOURCES[n].folder() is None]


def passages(source: Source) -> Iterator[tuple[str, str]]:
    """("prose" | "code", text) for every passage of fitting length, page by page."""
    root = source.folder()
    if root is None:
        raise ModelLoadError(f"{source.root}: not found; install `{source.package}` (apt-get)")
    for page in sorted(root.glob(source.pattern)):
        if page.name.startswith(_SKIPPED_PAGES):
            continue
        blocks = _Blocks()
        blocks.feed(page.read_text(errors="replace"))
        blocks.close()
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


def read_prompts(path: Path) -> list[str]:
    """A prompts file: JSON lines (.jsonl, one string each) or plain lines."""
    if not path.exists():
        raise ModelLoadError(f"{path}: prompts file not found")
    lines = path.read_text().splitlines()
    if path.suffix != ".jsonl":
        return [line.strip() for line in lines if line.strip()]
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise ModelLoadError(
                f"{path}:{i}: not JSON ({e}); a .jsonl holds one JSON string a line"
            ) from None
        if not isinstance(value, str):
            raise ModelLoadError(f"{path}:{i}: a JSON string expected")
        prompts.append(value)
    return prompts


def make(out: Path, per_source: int, held_out: int, seed: int) -> dict:
    """train.jsonl from the training sources, held-out.jsonl from the held-out ones, and
    sources.json saying which packages and licences they came from."""
    missing = missing_packages((*TRAINING, *HELD_OUT))
    if missing:
        raise ModelLoadError(
            f"install the documentation first: apt-get install {' '.join(missing)}"
        )
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
        {
            "name": n,
            "package": SOURCES[n].package,
            "licence": SOURCES[n].licence,
            "folder": str(SOURCES[n].folder()),
        }
        for n in names
    ]
