"""The user's cache of what mtpd derives from files once and keeps between runs (the
compiled CPU kernels, GGUF headers). Only a directory that this user alone can write to
is used: what lies there is trusted, and a kernel library is loaded as code."""

from __future__ import annotations

import os
from pathlib import Path


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
