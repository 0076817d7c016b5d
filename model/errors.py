"""Errors a user can fix: bad files, bad parameters, requests beyond a bound. The CLI
prints them as one line without a traceback; servers map them to a status."""


class InputError(Exception):
    """The base of every error whose message is meant for the user."""


class ModelLoadError(InputError):
    """A checkpoint could not be loaded; the message names the file or tensor at fault."""


class InvalidParameter(InputError, ValueError):
    """A generation parameter is out of range; the message names it."""
