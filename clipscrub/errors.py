"""Errors that stop a stage with a one-line message naming what is wrong."""

from __future__ import annotations


class ClipscrubError(Exception):
    """An error the user can fix: bad parameter, missing file, empty dataset.

    ``param`` names the parameter (``index.k``) or input (``embed.checkpoint``) at fault, so the
    CLI prints ``clipscrub: error: index.k: ...`` on one line.
    """

    def __init__(self, message: str, *, param: str | None = None):
        self.param = param
        self.message = message
        super().__init__(f"{param}: {message}" if param else message)


class ParamError(ClipscrubError):
    """A parameter value is invalid or inconsistent with another one."""


class DataError(ClipscrubError):
    """Input data is missing, empty or malformed."""
