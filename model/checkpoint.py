"""Checkpoint access in Hugging Face conventions, whatever the file format.

A checkpoint exposes a config.json-style dict, tensor names in HF naming, a reader that
loads only the named tensors (a pipeline worker reads only its own layers), and the
tokenizer. `open_checkpoint` picks the format from the path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import tokenizers
from safetensors import SafetensorError, safe_open

from mtpd.model.config import ModelConfig
from mtpd.model.errors import ModelLoadError

if TYPE_CHECKING:  # tensors are read (into torch) by workers only: the daemon reads none
    import torch

    from mtpd.model.quant import Int4Weight

log = logging.getLogger("mtpd.model")

# Multimodal Qwen3.5 checkpoints name the decoder's tensors model.language_model.* and
# hold a vision tower beside it.
WRAPPED_DECODER, VISION_TOWER = "model.language_model.", "model.visual."


class Checkpoint(Protocol):
    path: Path
    hf_config: dict[str, Any]
    chat_template: str | dict[str, str] | None  # one template, or named ones (tool_use...)

    def tensor_names(self) -> set[str]: ...

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]: ...

    def stored_bytes(self, name: str) -> bytes:
        """A tensor's data as the file stores it, read without torch."""

    def tokenizer(self) -> tokenizers.Tokenizer: ...

    def int4_blocks(self, names: tuple[str, ...]) -> Int4Weight | None:
        """Exact int4 groups of these tensors when the file stores them so (GGUF Q4)."""

    def stored_at_8_bits(self, names: tuple[str, ...]) -> bool:
        """Whether any of these tensors is stored with 8-bit weights (GGUF Q8_0)."""


class HFCheckpoint:
    """A Hugging Face directory: config.json, safetensors (sharded or not), tokenizer.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hf_config = _read_json(path / "config.json")
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelLoadError(f"{index}: no 'weight_map' object")
            self._file_of = {name: path / f for name, f in weight_map.items()}
        else:
            single = path / "model.safetensors"
            if not single.exists():
                raise ModelLoadError(
                    f"{path}: no model.safetensors or model.safetensors.index.json"
                )
            with _open_safetensors(single, "numpy") as f:  # names only: no torch
                self._file_of = dict.fromkeys(f.keys(), single)
        self._file_of, self._stored_name = _text_decoder_names(self._file_of, path)
        self.chat_template = self._find_chat_template()

    def int4_blocks(self, names: tuple[str, ...]) -> Int4Weight | None:
        return None  # safetensors weights are floats

    def stored_at_8_bits(self, names: tuple[str, ...]) -> bool:
        return False

    def tensor_names(self) -> set[str]:
        return set(self._file_of)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._file_of:
                raise ModelLoadError(f"{self.path}: checkpoint has no tensor {name!r}")
            by_file.setdefault(self._file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            with _open_safetensors(file, "pt") as f:
                for name in wanted:
                    try:
                        out[name] = f.get_tensor(self._stored_name[name])
                    except (SafetensorError, KeyError) as e:
                        raise ModelLoadError(f"{file}: cannot read tensor {name!r}: {e}") from e
        return out

    def stored_bytes(self, name: str) -> bytes:
        """Read by the safetensors header's offsets: the library gives tensors only, and
        numpy (the one torch-free framework it offers) has no bfloat16."""
        file = self._file_of.get(name)
        if file is None:
            raise ModelLoadError(f"{self.path}: checkpoint has no tensor {name!r}")
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(min(header_len, _MAX_HEADER)))
                start, end = header[self._stored_name[name]]["data_offsets"]
                if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                    raise ValueError(f"data offsets {start!r}, {end!r}")
            except (ValueError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{file}: unreadable safetensors header: {e}") from e
            f.seek(8 + header_len + start)
            data = f.read(end - start)
        if len(data) != end - start:
            raise ModelLoadError(f"{file}: tensor {name!r} is cut short (truncated file?)")
        return data

    def tokenizer(self) -> tokenizers.Tokenizer:
        file = self.path / "tokenizer.json"
        if not file.exists():
            raise ModelLoadError(f"{self.path}: no tokenizer.json")
        try:
            return tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:
            raise ModelLoadError(f"{file}: not a valid tokenizer: {e}") from e

    def _find_chat_template(self) -> str | dict[str, str] | None:
        """Where transformers keeps them: chat_template.jinja and
        additional_chat_templates/NAME.jinja, else tokenizer_config.json's chat_template
        (a string, or a list of {"name", "template"})."""
        named = {}
        jinja = self.path / "chat_template.jinja"
        if jinja.exists():
            named["default"] = jinja.read_text()
        named |= {
            f.stem: f.read_text()
            for f in sorted((self.path / "additional_chat_templates").glob("*.jinja"))
        }
        tok_cfg = self.path / "tokenizer_config.json"
        if not named and tok_cfg.exists():
            template = _read_json(tok_cfg).get("chat_template")
            if isinstance(template, str):
                return template
            if isinstance(template, list):
                named = {
                    t["name"]: t["template"]
                    for t in template
                    if isinstance(t, dict)
                    and isinstance(t.get("name"), str)
                    and isinstance(t.get("template"), str)
                }
        if list(named) == ["default"]:
            return named["default"]
        return named or None


def _text_decoder_names(
    file_of: dict[str, Path], path: Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """A multimodal checkpoint's decoder under the text-only names (model.*), without its
    vision tower: each name's file, and the name it is stored under."""
    vision = sum(1 for n in file_of if n.startswith(VISION_TOWER))
    if vision:
        log.info("%s: skipping the vision tower's %d tensors (%s*)", path, vision, VISION_TOWER)
    files, stored = {}, {}
    for name, file in file_of.items():
        if name.startswith(VISION_TOWER):
            continue
        text_name = name
        if name.startswith(WRAPPED_DECODER):
            text_name = "model." + name.removeprefix(WRAPPED_DECODER)
        files[text_name], stored[text_name] = file, name
    return files, stored


_MAX_HEADER = 100 << 20  # safetensors' own bound on a header


@contextmanager
def _open_safetensors(file: Path, framework: str) -> Iterator[Any]:
    """safe_open with errors that name the file (a truncated file fails here)."""
    if not file.exists():
        raise ModelLoadError(f"{file}: file not found")
    try:
        handle = safe_open(str(file), framework=framework)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{file}: not a readable safetensors file: {e}") from e
    with handle as f:
        yield f


def _read_json(file: Path) -> dict[str, Any]:
    if not file.exists():
        raise ModelLoadError(f"{file}: file not found")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: expected a JSON object")
    return data


def read_config(ckpt: Checkpoint) -> ModelConfig:
    source = ckpt.path / "config.json" if ckpt.path.is_dir() else ckpt.path
    return ModelConfig.from_hf(ckpt.hf_config, source=str(source))


# Small tensors that any fine-tune changes (model_identity).
_IDENTITY_PROBES = ("model.norm.weight", "model.layers.0.input_layernorm.weight")


def model_identity(ckpt: Checkpoint, cfg: ModelConfig) -> str:
    """A cheap identity for "the same model" between a daemon and a remote worker: the
    architecture, the tensor names, and two small tensors as stored. It reads almost
    nothing and no torch, so the daemon (which holds no weights) computes it too."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    digest.update("\n".join(sorted(ckpt.tensor_names())).encode())
    for name in _IDENTITY_PROBES:
        digest.update(name.encode())
        digest.update(ckpt.stored_bytes(name))
    return digest.hexdigest()[:32]


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        return HFCheckpoint(path)
    if path.suffix == ".gguf":
        from mtpd.model.gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint(path)
    raise ModelLoadError(f"{path}: expected a Hugging Face model directory or a .gguf file")
