"""`mtpd train-data`: requests made from documentation HTML, split by source. Run on
small pages written here, in place of the Debian packages' folders."""

from __future__ import annotations

import json
import random

import pytest

from mtpd.cli import main
from mtpd.model.errors import ModelLoadError
from mtpd.train import sources
from mtpd.train.sources import Source, passages, read_prompts, request

PROSE = "The {name} manual explains how its tools read files, and why each option exists. " * 3
CODE = 'def add(a, b):\n    """The sum."""\n    return (a + b)\n\n\nprint(add(1, 2))'


def page(name: str) -> str:
    return f"""<html><head><title>t</title><script>var x = "{PROSE}";</script></head>
<body><nav><p>{PROSE}</p></nav>
<p>{PROSE.format(name=name)}</p>
<p>Too short.</p>
<ul><li>{PROSE.format(name=name + " list")}</li></ul>
<pre>{CODE.replace("<", "&lt;")}</pre>
</body></html>"""


@pytest.fixture
def docs(tmp_path, monkeypatch):
    table = {}
    for name in (*sources.TRAINING, *sources.HELD_OUT):
        root = tmp_path / name
        root.mkdir()
        for i in range(3):
            (root / f"page{i}.html").write_text(page(f"{name}-{i}"))
        table[name] = Source(name, f"{name}-doc", "free", str(root))
    monkeypatch.setattr(sources, "SOURCES", table)
    return tmp_path


def test_passages_are_the_pages_prose_and_code_only(docs):
    found = list(passages(sources.SOURCES["git"]))
    prose = [t for kind, t in found if kind == "prose"]
    assert sorted(prose) == sorted(
        " ".join(PROSE.format(name=n).split())
        for i in range(3)
        for n in (f"git-{i}", f"git-{i} list")
    )  # not the script's, the navigation's or the short paragraph
    assert [t for kind, t in found if kind == "code"] == [CODE] * 3


def test_requests_ask_in_many_ways_and_a_bug_to_fix_lacks_one_bracket():
    rng = random.Random(0)
    asks = {request("prose", PROSE.format(name="x"), rng).split(":")[0] for _ in range(400)}
    assert len({a.split(" into ")[0] for a in asks}) == 6  # and 4 languages to translate into
    assert len(asks) == 9
    fixes = [r for r in (request("code", CODE, rng) for _ in range(200)) if "bug" in r]
    assert fixes and all(r.count(")") == CODE.count(")") - 1 for r in fixes)


def test_train_data_splits_by_source_and_round_trips(docs, capsys):
    out = docs / "out"
    assert main(["train-data", "--out", str(out), "--per-source", "4", "--held-out", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    train, held_out = read_prompts(out / "train.jsonl"), read_prompts(out / "held-out.jsonl")
    assert summary["train"]["requests"] == len(train) == 12
    assert summary["held_out"]["requests"] == len(held_out) == 4
    assert [s["package"] for s in summary["held_out"]["sources"]] == [
        f"{n}-doc" for n in sources.HELD_OUT
    ]
    assert any("\n" in r for r in train)  # requests span lines, one JSON string each
    for name in sources.HELD_OUT:  # no held-out source's text is in training, and back
        assert not any(name in r for r in train)
    assert all(any(name in r for name in sources.HELD_OUT) or "def add" in r for r in held_out)


def test_a_missing_package_or_a_bad_line_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"install `python3\.11-doc`"):
        next(passages(Source("python", "python3.11-doc", "PSF-2.0", str(tmp_path / "absent"))))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"not": "a string"}\n')
    with pytest.raises(ModelLoadError, match=r"bad\.jsonl:2: a JSON string expected"):
        read_prompts(bad)
    bad.write_text('"fine"\nplain text\n')
    with pytest.raises(ModelLoadError, match=r"bad\.jsonl:2: not JSON"):
        read_prompts(bad)


def test_blocks_are_their_own_text(tmp_path):
    """A block inside another is a passage of its own; DocBook's <div class="para"> is
    a paragraph; navigation, unclosed items and contents pages are handled."""
    a, b, c = (f"{w} " * 40 for w in ("alpha", "beta", "gamma"))
    code = "for i in range(10):\n    print(i)  # each number on a line of its own"
    root = tmp_path / "doc"
    root.mkdir()
    (root / "page.html").write_text(
        f"""<html><body>
<div role="navigation"><p>{"menu " * 40}</p></div>
<div class="sphinxsidebar"><p>{"side " * 40}</p></div>
<ul><li><p>{a}</p><p>{b}</p></li><li>{c}<pre>{code}</pre></li><li>{a}</ul>
<div class="section"><div class="para">{c}<span>{b}</span></div></div>
</body></html>"""
    )
    (root / "contents.html").write_text(f"<p>{'title ' * 40}</p>")
    found = list(passages(Source("doc", "doc", "free", str(root))))
    words = " ".join
    assert sorted(found) == sorted(
        [
            ("prose", words(a.split())),
            ("prose", words(b.split())),
            ("prose", words(c.split())),  # the item's own text: its code is apart
            ("code", code),
            ("prose", words(a.split())),  # the unclosed item, ended by </ul>
            ("prose", words((c + b).split())),
        ]
    )


def test_a_work_dir_refuses_data_from_other_prompts(tmp_path):
    from mtpd.train.collect import _check_same_data

    _check_same_data(tmp_path, ["one", "two"], [], "none")
    _check_same_data(tmp_path, ["one", "two", "three"], [], "none")  # appended: goes on
    refused = "other prompts, another corpus or another trunk"
    with pytest.raises(ModelLoadError, match=refused):
        _check_same_data(tmp_path, ["other", "two", "three"], [], "none")
    with pytest.raises(ModelLoadError, match=refused):
        _check_same_data(tmp_path, ["one", "two", "three"], ["a corpus"], "none")
    with pytest.raises(ModelLoadError, match=rf"{refused} \(quant none, taps \[\]\)"):
        _check_same_data(tmp_path, ["one", "two", "three"], [], "int4")
    # Rows from a tapped trunk are wider: another tap list is other data.
    with pytest.raises(ModelLoadError, match=refused):
        _check_same_data(tmp_path, ["one", "two", "three"], [], "none", (20, 25))
    # A work dir recorded before the trunk was (no "quant") holds float32 data.
    record = tmp_path / "collected-from.json"
    held = json.loads(record.read_text())
    del held["quant"]
    record.write_text(json.dumps(held))
    _check_same_data(tmp_path, ["one", "two", "three"], [], "none")
    with pytest.raises(ModelLoadError, match=refused):
        _check_same_data(tmp_path, ["one", "two", "three"], [], "int8")
