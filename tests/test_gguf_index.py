"""A GGUF header parsed once and cached: what the cache gives is what gguf's own reader
gives (the oracle), a changed file or a damaged entry is read again, and the cache is
bounded and private."""

from __future__ import annotations

import json
import os
import time

import gguf
import numpy as np
import pytest
from test_gguf_checkpoint import write_gguf

from mtpd.model import gguf_index
from mtpd.model.gguf_index import GGUFIndex


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "cache-home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "mtpd" / "gguf"


def tiny_file(path, rope_base: float = 1e4):
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((4, 8), dtype=np.float32)}
    return write_gguf(path, tensors=tensors, rope_freq_base=rope_base)


def parsed_only(monkeypatch) -> None:
    """From here on the index may not parse: it must come from the cache."""

    def refuse(path):
        raise AssertionError("parsed again instead of read from the cache")

    monkeypatch.setattr(gguf_index, "GGUFReader", refuse)


def assert_same_as_gguf_reads(index: GGUFIndex, path) -> None:
    reader = gguf.GGUFReader(path)
    assert index.metadata == {name: f.contents() for name, f in reader.fields.items()}
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(index.tensors, reader.tensors, strict=True):
        assert ours.kind == theirs.tensor_type
        data = index.data(ours)
        assert data.dtype == theirs.data.dtype and data.shape == theirs.data.shape
        assert np.array_equal(data.view(np.uint8), np.asarray(theirs.data).view(np.uint8))


def test_the_cached_index_is_what_gguf_reads(tmp_path, cache_home, monkeypatch):
    path = tiny_file(tmp_path / "tiny.gguf")
    assert_same_as_gguf_reads(GGUFIndex.open(path), path)
    assert len(list(cache_home.glob("*.json"))) == 1
    parsed_only(monkeypatch)
    assert_same_as_gguf_reads(GGUFIndex.open(path), path)


def test_a_rewritten_file_is_read_again(tmp_path):
    path = tiny_file(tmp_path / "tiny.gguf", rope_base=1e4)
    assert GGUFIndex.open(path).metadata["llama.rope.freq_base"] == 1e4
    size = path.stat().st_size
    path.unlink()
    tiny_file(path, rope_base=2e4)  # the same size, maybe the same inode and mtime
    assert path.stat().st_size == size
    assert GGUFIndex.open(path).metadata["llama.rope.freq_base"] == 2e4


@pytest.mark.parametrize(
    "damage",
    ["not json", "too few fields", "offset past the end", "bogus dtype", "negative shape"],
)
def test_a_damaged_entry_is_not_trusted(tmp_path, cache_home, damage):
    path = tiny_file(tmp_path / "tiny.gguf")
    GGUFIndex.open(path)
    (entry,) = cache_home.glob("*.json")
    if damage == "not json":
        entry.write_text("{ this is not")
    else:
        saved = json.loads(entry.read_text())
        tensor = saved["tensors"][0]
        if damage == "too few fields":
            saved["tensors"] = [tensor[:2]]
        elif damage == "offset past the end":
            tensor[2] = path.stat().st_size
        elif damage == "bogus dtype":
            tensor[3] = "bogus"
        else:
            tensor[4] = [-1, 8]
        entry.write_text(json.dumps(saved))
    assert_same_as_gguf_reads(GGUFIndex.open(path), path)
    json.loads(entry.read_text())  # written again, whole


def test_the_cache_keeps_the_files_opened_last(tmp_path, cache_home, monkeypatch):
    monkeypatch.setattr(gguf_index, "MAX_CACHED_FILES", 2)
    paths = [tiny_file(tmp_path / f"m{i}.gguf") for i in range(3)]
    for path in paths:
        GGUFIndex.open(path)
        time.sleep(0.05)  # file times may be as coarse as the kernel's tick
    assert len(list(cache_home.glob("*.json"))) == 2
    parsed_only(monkeypatch)
    for path in paths[1:]:
        GGUFIndex.open(path)
    with pytest.raises(AssertionError, match="parsed again"):
        GGUFIndex.open(paths[0])


def test_no_cache_in_a_directory_others_can_write(tmp_path, cache_home):
    cache_home.mkdir(parents=True)
    os.chmod(cache_home, 0o777)
    path = tiny_file(tmp_path / "tiny.gguf")
    assert_same_as_gguf_reads(GGUFIndex.open(path), path)
    assert not list(cache_home.glob("*.json"))
