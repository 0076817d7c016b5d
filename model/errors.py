"""Errors a user can fix: bad files, bad parameters, requests beyond a bound. The CLI
prints them as one line without a traceback; servers map them to a status."""


class InputError(Exception):
    """The base of every error whose message is meant for the user."""


class ModelLoadError(InputError):
    """A checkpoint could not be loaded; the message names the file or tensor at fault."""


class InvalidParameter(InputError, ValueError):
    """A generation parameter is out of range; the message names it, and `param` is its
    name as the APIs spell it (OpenAI's error shape carries it), when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_unicode(text: str, field: str) -> None:
    """Refuse a string that is not valid Unicode: a lone surrogate (JSON's "\\ud800", or
    bytes that were not UTF-8 in a command line) would fail deep in a tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameter(
            f"{field}: not valid Unicode (a lone surrogate {text[e.start]!r} at {e.start})", field
        ) from None
