"""`difflm bench`: measurements that belong in docs/benchmarks.md, never in timed tests.

    difflm bench asha sweeps/noise_schedules.yaml --set sweep.budget.max_steps=200
    difflm bench grid sweeps/noise_schedules.yaml --set sweep.budget.max_steps=200   # in-process, no Ray
    difflm bench sampling runs/quickstart --steps 1000 --length 128
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator.bench.grid import grid
from orchestrator.cli.common import user_errors


@click.group()
def bench() -> None:
    """Benchmarks (results go to docs/benchmarks.md)."""


@bench.command()
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field of the sweep file.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/bench"), show_default=True)
@user_errors
def asha(sweep_file: Path, overrides: tuple[str, ...], output: Path) -> None:
    """Compute ASHA saves on SWEEP_FILE against running every trial to the full budget."""
    from orchestrator.bench.asha import asha_report

    click.echo(asha_report(sweep_file, overrides, output))


@bench.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
@user_errors
def sampling(ctx: click.Context) -> None:
    """ddpm_cache vs ddpm side by side (arguments as `python -m orchestrator.bench.sampling -h`)."""
    from orchestrator.bench.sampling import main as bench_main

    sys.exit(bench_main(list(ctx.args)))


# grid's click command lives with its logic in orchestrator/bench/grid.py; user errors exit 2 like the others
grid.callback = user_errors(grid.callback)
bench.add_command(grid)
