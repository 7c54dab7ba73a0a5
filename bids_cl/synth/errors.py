"""The one error type of the phantom generator: a ``BidsClError`` (one-line message + exit code)."""

from __future__ import annotations

from bids_cl.errors import EXIT_CANNOT_CREATE_OUTPUT, EXIT_MISSING_INPUT, EXIT_USAGE, BidsClError

EXIT_CANNOT_CREATE = EXIT_CANNOT_CREATE_OUTPUT

__all__ = ["EXIT_CANNOT_CREATE", "EXIT_MISSING_INPUT", "EXIT_USAGE", "SynthError"]


class SynthError(BidsClError):
    """A phantom could not be generated; ``str(err)`` is a one-line reason, ``err.code`` an exit code."""
