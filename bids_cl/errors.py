"""Errors with BIDS-Apps exit codes (BIDS execution specification, outputs section)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_DATA_SELECTED = 18
EXIT_USAGE = 64
EXIT_BAD_DATA = 65
EXIT_MISSING_INPUT = 66
EXIT_CANNOT_CREATE_OUTPUT = 73

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
}


class BidsClError(Exception):
    """An anticipated failure: one line for the user and the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message
