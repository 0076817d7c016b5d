"""The daemon's configuration: `mtpd serve`'s flags, also settable in a TOML file
(`/etc/mtpd/mtpd.toml`, or `--config`/$MTPD_CONFIG) and in the environment
(`MTPD_<FLAG>`, e.g. MTPD_WORKERS=2). A flag beats the environment, which beats the
file, which beats the built-in default. Keys are the flags' names with underscores
(`max_context = 4096`); every value is checked as its flag would be, and an error names
the key and where it came from."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtpd.model.errors import InputError

DEFAULT_CONFIG = Path("/etc/mtpd/mtpd.toml")
CONFIG_ENV = "MTPD_CONFIG"
ENV_PREFIX = "MTPD_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "default", the file's path, or the environment variable's name


def config_path(explicit: str | None) -> tuple[Path, bool]:
    """The file to read, and whether it must exist (it must when named)."""
    named = explicit or os.environ.get(CONFIG_ENV)
    return (Path(named), True) if named else (DEFAULT_CONFIG, False)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's configurable options by key (help, version and --config aside)."""
    return {
        a.dest: a
        for a in parser._actions  # argparse has no public accessor for its options
        if a.option_strings and a.dest not in ("help", "config")
    }


def _convert(action: argparse.Action, raw: Any, where: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction | argparse.BooleanOptionalAction):
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in _TRUE + _FALSE:
            return text in _TRUE
        raise InputError(f"{where}: expected true or false, got {raw!r}")
    if isinstance(raw, bool | dict | list):
        raise InputError(f"{where}: expected a single value, got {raw!r}")
    try:
        value = action.type(str(raw)) if action.type else str(raw)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise InputError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise InputError(f"{where}: {raw!r} is not one of {choices}")
    return value


def load(parser: argparse.ArgumentParser, explicit: str | None) -> dict[str, Setting]:
    """Every configurable option's value without command-line flags, and its source."""
    options = _options(parser)
    settings = {key: Setting(a.default, "default") for key, a in options.items()}
    path, required = config_path(explicit)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise InputError(f"{path}: no such configuration file") from None
        table = {}
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    for key, raw in table.items():
        if key not in options:
            raise InputError(f"{path}: unknown key {key!r} (keys are mtpd serve's flags)")
        settings[key] = Setting(_convert(options[key], raw, f"{path}: {key}"), str(path))
    for key, action in options.items():
        name = ENV_PREFIX + key.upper()
        if name in os.environ:
            value = _convert(action, os.environ[name], f"${name}")
            settings[key] = Setting(value, f"${name}")
    return settings


def apply(parser: argparse.ArgumentParser, explicit: str | None) -> dict[str, Setting]:
    """Make the file and the environment the parser's defaults (flags still win)."""
    settings = load(parser, explicit)
    parser.set_defaults(**{k: s.value for k, s in settings.items() if s.source != "default"})
    return settings


def render(settings: dict[str, Setting]) -> str:
    """The effective configuration as TOML, each line saying where its value came from."""
    lines = []
    for key, s in sorted(settings.items()):
        if s.value is None:
            lines.append(f"# {key} is unset")
            continue
        value = s.value
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = str(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key} = {text}  # {s.source}")
    return "\n".join(lines)
