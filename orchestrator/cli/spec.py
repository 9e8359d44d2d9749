"""`difflm validate` and `difflm schema`: check spec files and print their JSON Schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from orchestrator.cli.common import profile_defaults
from orchestrator.errors import SpecError
from orchestrator.spec.files import json_schema, validate_file


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Apply overrides before validating.")
@click.option("--profile", metavar="NAME|PATH", help="Validate run/sweep specs with this scaling profile under them.")
def validate(files: tuple[Path, ...], overrides: tuple[str, ...], profile: str | None) -> None:
    """Check run specs, sweep files, scaling profiles and Ray cluster configs; exit 2 if any file is bad."""
    bad = 0
    try:
        defaults, _ = profile_defaults(profile)
    except SpecError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    for f in files:
        try:
            kind = validate_file(f, list(overrides), defaults)
            click.echo(f"ok: {f} ({kind}{' spec' if kind in ('run', 'sweep') else ''})")
        except SpecError as exc:
            bad += 1
            click.echo(f"error: {exc}", err=True)
    if bad:
        sys.exit(2)


@click.command()
@click.option("--sweep", is_flag=True, help="Print the sweep-file schema instead of the run spec's.")
def schema(sweep: bool) -> None:
    """Print the JSON Schema of the run spec (for editor completion)."""
    click.echo(json.dumps(json_schema(sweep=sweep), indent=2))
