"""pixfound's own exception types.

A :class:`UserError` is a mistake in what the user gave: a flag, a file, a folder, a missing
optional package or model. The command line prints its message on one line and exits 2. Every
other exception is a bug (or a fault of the machine) and keeps its traceback.

``UserError`` subclasses ``ValueError`` so that code which validated with ``ValueError`` before
keeps catching it.
"""
from __future__ import annotations

__all__ = ["UserError", "DataError", "JudgeError", "MissingFileError", "OutputExistsError"]


class UserError(ValueError):
    """Bad input from the user: one line, exit 2, no traceback."""


class DataError(UserError):
    """A benchmark file or entry is missing or malformed (the message names the file and row)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or a benchmark needs) does not exist."""


class OutputExistsError(UserError):
    """A command would overwrite an input or an earlier result; ``--force`` allows it."""


class JudgeError(RuntimeError):
    """A judge request failed; the message names the endpoint and the cause, never the key."""
