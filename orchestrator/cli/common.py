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

PROFILE_HELP = (
    "Scaling profile: a name in clusters/ (cpu, laptop-mps, workstation-6gpu) or a profile file. "
    "It sets defaults under the spec: the spec file and --set still win."
)


def profile_defaults(profile: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the profile's partial run spec, a line saying what it set) for --profile; (None, None) without one."""
    if profile is None:
        return None, None
    from orchestrator.cluster.profile import load_profile

    prof, path = load_profile(profile)
    defaults = prof.defaults()
    fields = ", ".join(f"{s}.{k}={v}" for s, sec in defaults.items() for k, v in sec.items())
    return defaults, f"profile {path}: {fields} (the spec and --set override these)"


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
