"""Errors with BIDS-Apps exit codes (BIDS execution specification, outputs section)."""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_DATA_SELECTED = 18
EXIT_USAGE = 64
EXIT_BAD_DATA = 65
EXIT_MISSING_INPUT = 66
EXIT_CANNOT_CREATE_OUTPUT = 73
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT (128 + 2)

EXIT_CODE_MEANINGS = {
    EXIT_OK: "success",
    EXIT_FAILURE: "unspecified failure",
    EXIT_VALIDATION: "the input dataset failed BIDS validation",
    EXIT_UNKNOWN_LEVEL: "unknown analysis level",
    EXIT_NO_DATA_SELECTED: "the participant/session labels or filters selected no data",
    EXIT_USAGE: "command-line usage error",
    EXIT_BAD_DATA: "input data unusable (corrupt, empty, wrong dimensionality)",
    EXIT_MISSING_INPUT: "a required input is missing",
    EXIT_CANNOT_CREATE_OUTPUT: "cannot create the output",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


# errno values that mean "this output cannot be written here" rather than a bug.
_CANNOT_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class BidsClError(Exception):
    """An anticipated failure: one line for the user and the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


def output_error(exc: OSError) -> BidsClError | None:
    """``BidsClError(73)`` naming the file and the folder when ``exc`` means the output cannot be written
    (disk full, quota, read-only, permission); None for other OS errors."""
    if exc.errno not in _CANNOT_WRITE_ERRNOS:
        return None
    import os

    name = exc.filename or ""
    where = f" {name} (in {os.path.dirname(os.fspath(name)) or '.'})" if name else ""
    return BidsClError(f"cannot write{where}: {exc.strerror or exc}", EXIT_CANNOT_CREATE_OUTPUT)


def as_bids_cl_error(exc: BaseException) -> BidsClError:
    """The one-line ``BidsClError`` a failed step reports for ``exc``: itself when it is one; exit 73
    when an OS error means the output cannot be written; else exit 1 naming the exception's type."""
    if isinstance(exc, BidsClError):
        return exc
    if isinstance(exc, OSError):
        return output_error(exc) or BidsClError(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
    return BidsClError(f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILURE)
