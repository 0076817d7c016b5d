"""A GGUF file's header (its metadata, and where each tensor's data lies) read once by the
gguf library and kept in the user's cache under the file's identity.

gguf's reader makes a numpy view of every string of the vocabulary and merges: 1.7 s for
SmolLM2-135M's 49k tokens, in the daemon and again in every worker, on every start. What
it yields is small (about 1 MB of JSON here) and loads in milliseconds; a tensor's data
is then a view of one private memory map of the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from mtpd.model.user_cache import private_cache_dir

FORMAT = 1  # of the cached index; a different one is parsed again
MAX_CACHED_FILES = 32  # the least recently opened go first


@dataclass(frozen=True)
class TensorInfo:
    name: str  # as stored in the file
    kind: GGMLQuantizationType
    offset: int  # of its data, from the file's start
    dtype: str  # the numpy dtype and shape that gguf's reader gives its data
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return np.dtype(self.dtype).itemsize * math.prod(self.shape)


class GGUFIndex:
    """Metadata values as gguf decodes them (`ReaderField.contents()`), and the tensors in
    file order. Opening raises whatever gguf raises on a malformed file."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: list[TensorInfo]) -> None:
        self.path, self.metadata, self.tensors = path, metadata, tensors
        with open(path, "rb") as f:
            # Private (copy on write): torch can wrap the arrays without copying them
            # (it warns on read-only memory), and nothing written reaches the file.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if any(t.offset < 0 or t.offset + t.nbytes > len(self._map) for t in tensors):
            raise ValueError("a tensor's data lies beyond the end of the file")

    @classmethod
    def open(cls, path: Path) -> GGUFIndex:
        identity = _identity(path)
        entry = _cache_entry(path)
        if entry is not None and (cached := _load(entry, identity)) is not None:
            try:
                index = cls(path, *cached)
                os.utime(entry)  # recently used
                return index
            except (OSError, ValueError):
                pass  # stale or damaged: parsed again below
        index = cls._parse(path)
        if entry is not None:
            _store(entry, identity, index)
        return index

    @classmethod
    def _parse(cls, path: Path) -> GGUFIndex:
        reader = GGUFReader(path)
        metadata = {name: field.contents() for name, field in reader.fields.items()}
        tensors = [
            TensorInfo(t.name, t.tensor_type, t.data_offset, t.data.dtype.str, t.data.shape)
            for t in reader.tensors
        ]
        return cls(path, metadata, tensors)

    def data(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's data as gguf's reader shapes it, a view of the file's mapping."""
        count = math.prod(tensor.shape)
        flat = np.frombuffer(self._map, tensor.dtype, count=count, offset=tensor.offset)
        return flat.reshape(tensor.shape)


def _identity(path: Path) -> list[int | str]:
    """What says the file is the one that was parsed, and by which parser."""
    st = os.stat(path)
    # ctime too: no tool can set it, so a file rewritten with its old size and mtime
    # (cp -p) still differs.
    return [
        FORMAT,
        version("gguf"),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    ]


def _cache_entry(path: Path) -> Path | None:
    folder = private_cache_dir("gguf")
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    return None if folder is None else folder / f"{name}.json"


def _load(entry: Path, identity: list[int | str]) -> tuple[dict, list[TensorInfo]] | None:
    try:
        saved = json.loads(entry.read_text(encoding="utf-8"))
        if saved["identity"] != identity or not isinstance(saved["metadata"], dict):
            return None
        tensors = [
            TensorInfo(name, GGMLQuantizationType(kind), offset, dtype, tuple(shape))
            for name, kind, offset, dtype, shape in saved["tensors"]
        ]
        return saved["metadata"], tensors
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(entry: Path, identity: list[int | str], index: GGUFIndex) -> None:
    """Written under a private name and renamed: processes starting together may race.
    Failing to cache only costs the next start its parse."""
    tensors = [[t.name, int(t.kind), t.offset, t.dtype, list(t.shape)] for t in index.tensors]
    saved = {"identity": identity, "metadata": index.metadata, "tensors": tensors}
    try:
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=entry.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(saved, f)
        os.replace(tmp, entry)
        entries = sorted(entry.parent.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[:-MAX_CACHED_FILES]:
            old.unlink(missing_ok=True)
    except (OSError, TypeError, ValueError):
        Path(tmp).unlink(missing_ok=True)
