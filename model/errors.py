"""Errors a user can fix: bad files, bad configuration. The CLI prints them without a traceback."""


class ModelLoadError(Exception):
    """A checkpoint could not be loaded; the message names the file or tensor at fault."""
