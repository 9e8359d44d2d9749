"""What every command module of the CLI shares: the user-error wrapper and the device choices.

User errors (a bad spec, bad data, a request a family cannot honour) print one line on
stderr and exit 2; everything else is a bug or a training failure and is handled by the
command itself.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click

from difflm.data import DataError
from orchestrator.errors import SpecError

#: --device choices of the commands that run a checkpoint in-process
DEVICES = ("auto", "cuda", "mps", "cpu")

#: What --steps means, one meaning per command family (the --help of each says which):
#: sampling commands (sample, denoise, bench sampling) count denoising steps ...
DENOISE_STEPS_HELP = (
    "Denoising steps: the sampler's network calls per sample (sample, denoise and bench sampling: "
    "--steps always counts these)"
)
#: ... and training commands count optimizer steps (a run's length is train.max_steps: --set train.max_steps=N).
TRAIN_STEPS_HELP = (
    "Training commands count optimizer steps with --steps (a run's own length is --set train.max_steps=N)"
)

PROFILE_HELP = (
    "Scaling profile: a name in clusters/ (cpu, laptop-mps, workstation-6gpu) or a profile file. "
    "It sets defaults under the spec: the spec file and --set still win."
)


def profile_defaults(
    profile: str | None, precedence: str = "the spec and --set override these"
) -> tuple[dict[str, Any] | None, str | None]:
    """(the profile's partial run spec, a line saying what it set) for --profile; (None, None) without one."""
    if profile is None:
        return None, None
    from orchestrator.cluster.profile import load_profile

    prof, path = load_profile(profile)
    defaults = prof.defaults()
    fields = ", ".join(f"{s}.{k}={v}" for s, sec in defaults.items() for k, v in sec.items())
    return defaults, f"profile {path}: {fields} ({precedence})"


def profile_overrides(defaults: dict[str, Any]) -> list[str]:
    """A profile's fields as ``--set`` strings, for applying it *over* a saved spec (``difflm resume --profile``:
    the saved spec.yaml sets every field, so a profile under it would change nothing)."""
    import json

    out = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out.append(f"{prefix}={json.dumps(value)}")  # JSON is YAML: the --set parser reads it back

    for section, fields in defaults.items():
        walk(section, fields)
    return out


#: The environment variable that ``--debug`` sets (any non-empty value but 0 counts).
DEBUG_ENV = "DIFFLM_DEBUG"


def debug_enabled() -> bool:
    """Whether driver errors show their traceback (``--debug`` or ``DIFFLM_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        os.environ[DEBUG_ENV] = "1"


#: ``--debug`` for the group and every command that runs a driver (train, resume, sweep)
debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
    help=f"On an error, print the full traceback as well as the one-line message (same as {DEBUG_ENV}=1).",
)


def show_traceback(exc: BaseException) -> None:
    """With ``--debug``, the traceback of ``exc`` on stderr (before the one-line message)."""
    if debug_enabled():
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


#: appended to a driver's one-line error when the traceback is hidden
DEBUG_HINT = f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map the errors a user can fix (SpecError, DataError) to one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SpecError, DataError) as exc:
            show_traceback(exc)
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper
