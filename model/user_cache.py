"""The user's cache of what mtpd derives from files once and keeps between runs (the
compiled CPU kernels, GGUF headers). Only a directory that this user alone can write to
is used: what lies there is trusted, and a kernel library is loaded as code."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

STALE_TEMPORARY_S = 3600  # a half-written file this old was left by a killed process


def private_cache_dir(subfolder: str | None = None) -> Path | None:
    """$XDG_CACHE_HOME/mtpd (default ~/.cache/mtpd), or `subfolder` in it; None where
    such a directory cannot be made private to this user."""
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtpd"
        folders = [base, base / subfolder] if subfolder else [base]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = folder.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022 or not os.access(folder, os.W_OK):
                return None
        return folders[-1]
    except (OSError, RuntimeError):  # RuntimeError: no home directory
        return None


def prune(folder: Path, pattern: str, keep: int, temporary: str) -> None:
    """Keep the `keep` most recently used files matching `pattern` (a reader touches what
    it uses), and remove the `temporary` ones a killed writer left. A file that cannot
    be read or removed (gone meanwhile, another's) is passed over: pruning never fails
    what the caller built."""
    kept = []
    for path in folder.glob(pattern):
        with contextlib.suppress(OSError):
            kept.append((path.stat().st_mtime_ns, path))
    for _, path in sorted(kept, reverse=True)[keep:]:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    for path in folder.glob(temporary):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > STALE_TEMPORARY_S:
                path.unlink(missing_ok=True)
