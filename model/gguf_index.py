"""A GGUF file's header (its metadata, and where each tensor's data lies) read once by the
gguf library and kept in the user's cache.

gguf's reader makes a numpy view of every string of the vocabulary and merges: 1.7 s for
SmolLM2-135M's 49k tokens, in the daemon and again in every worker, on every start. What
it yields is small (about 1.6 MB of JSON here) and loads in milliseconds. An entry is
used only while the file's header bytes (everything before the tensor data, which is
all that metadata and tensor layout come from) hash as they did when it was parsed: a
rewritten file is parsed again however its size and times look. A tensor's data is a
view of one read-only memory map of the file.
"""

from __future__ import annotations

import contextlib
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

from mtpd.model.user_cache import private_cache_dir, prune

FORMAT = 2  # of the cached entry; another one is parsed again
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

    def __init__(
        self, path: Path, mapping: mmap.mmap, metadata: dict[str, Any], tensors: list[TensorInfo]
    ) -> None:
        self.path, self._map, self.metadata, self.tensors = path, mapping, metadata, tensors

    @classmethod
    def open(cls, path: Path) -> GGUFIndex:
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        entry = _cache_entry(path)
        cached = _load(entry, mapping) if entry is not None else None
        if cached is None:
            metadata, tensors, header_sha256 = _parse(path, mapping)
            if entry is not None:
                _store(entry, metadata, tensors, header_sha256)
            cached = metadata, tensors
        elif entry is not None:
            with contextlib.suppress(OSError):
                os.utime(entry)  # recently used
        return cls(path, mapping, *cached)

    def data(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's data as gguf's reader shapes it: a read-only view of the file."""
        count = math.prod(tensor.shape)
        flat = np.frombuffer(self._map, tensor.dtype, count=count, offset=tensor.offset)
        return flat.reshape(tensor.shape)


def _parse(path: Path, mapping: mmap.mmap) -> tuple[dict[str, Any], list[TensorInfo], str]:
    """The metadata, the tensors, and the header's digest."""
    reader = GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = [
        TensorInfo(t.name, t.tensor_type, t.data_offset, t.data.dtype.str, t.data.shape)
        for t in reader.tensors
    ]
    # The reader opened the path again: it must have read the bytes this index maps.
    header_sha256 = _header_digest(mapping, tensors)
    if _header_digest(reader.data, tensors) != header_sha256:
        raise ValueError("the file changed while it was read")
    return metadata, tensors, header_sha256


def _header_digest(data: mmap.mmap | np.ndarray, tensors: list[TensorInfo]) -> str:
    """Of every byte before the first tensor's data (the whole file when it has none)."""
    view = memoryview(data).cast("B")
    end = min((t.offset for t in tensors), default=len(view))
    return hashlib.sha256(view[:end]).hexdigest()


def _cache_entry(path: Path) -> Path | None:
    folder = private_cache_dir("gguf")
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    return None if folder is None else folder / f"{name}.json"


def _load(entry: Path, mapping: mmap.mmap) -> tuple[dict[str, Any], list[TensorInfo]] | None:
    """The cached index when it is whole and still describes this file, else None."""
    try:
        saved = json.loads(entry.read_text(encoding="utf-8"))
        if saved["format"] != [FORMAT, version("gguf")] or not isinstance(saved["metadata"], dict):
            return None
        tensors = [_tensor_info(*fields) for fields in saved["tensors"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(t.offset + t.nbytes > len(mapping) for t in tensors):
        return None
    if saved["header_sha256"] != _header_digest(mapping, tensors):
        return None
    return saved["metadata"], tensors


def _tensor_info(name: Any, kind: Any, offset: Any, dtype: Any, shape: Any) -> TensorInfo:
    """One cached tensor, checked as strictly as its use needs: TypeError or ValueError."""
    dims = tuple(shape)
    if not isinstance(name, str) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"bad tensor entry {name!r}")
    if not all(isinstance(n, int) and n >= 0 for n in dims) or np.dtype(dtype).kind not in "fiub":
        raise ValueError(f"bad tensor entry {name!r}")
    return TensorInfo(name, GGMLQuantizationType(kind), offset, np.dtype(dtype).str, dims)


def _store(
    entry: Path, metadata: dict[str, Any], tensors: list[TensorInfo], header_sha256: str
) -> None:
    """Written under a private name and renamed: processes starting together may race.
    Failing to cache only costs the next start its parse."""
    saved = {
        "format": [FORMAT, version("gguf")],
        "header_sha256": header_sha256,
        "metadata": metadata,
        "tensors": [[t.name, int(t.kind), t.offset, t.dtype, list(t.shape)] for t in tensors],
    }
    try:
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=entry.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(saved, f)
        os.replace(tmp, entry)
        prune(entry.parent, "*.json", MAX_CACHED_FILES, "*.tmp")
    except (OSError, TypeError, ValueError):
        Path(tmp).unlink(missing_ok=True)
