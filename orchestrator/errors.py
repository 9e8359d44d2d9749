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
