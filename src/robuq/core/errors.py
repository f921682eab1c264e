"""The errors robuq raises for a person to read: bad input they can fix, said in one message that names
the problem and what to do. Every other exception is a bug or a crash and keeps its traceback."""

from __future__ import annotations


class RobuqError(ValueError):
    """Bad input: a missing or damaged file, an option out of range, a model or setting robuq does not support.
    The command line prints its message as one line (``robuq --debug`` shows the traceback)."""


class RobuqFileNotFoundError(RobuqError, FileNotFoundError):
    """A file or folder robuq was given does not exist."""


class RobuqPermissionError(RobuqError, PermissionError):
    """A file or folder robuq was given cannot be read or written."""
