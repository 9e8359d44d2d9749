"""User-facing errors: one clear message, exit code 2, no traceback."""

from __future__ import annotations


class SpecError(Exception):
    """Bad input a user can fix (spec file, override, resources). The CLI prints it and exits 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TrainingStopped(RuntimeError):
    """The run stopped itself for a reason a restart cannot fix (a run of non-finite losses, a non-finite
    val metric). Not retried by Ray: the worker catches it, records it and ends; the CLI exits 1 with it."""
