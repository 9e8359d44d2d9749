"""What every command module of the CLI shares: the user-error wrapper and the device choices.

User errors (a bad spec, bad data, a request a family cannot honour) print one line on
stderr and exit 2; everything else is a bug or a training failure and is handled by the
command itself.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from difflm.data import DataError
from orchestrator.errors import SpecError

#: --device choices of the commands that run a checkpoint in-process
DEVICES = ("auto", "cuda", "mps", "cpu")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map the errors a user can fix (SpecError, DataError) to one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SpecError, DataError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper
