"""`difflm doctor SPEC`: pre-flight checks before a long run, in-process (no Ray), well under a minute
on a CPU at size tiny/small.

    difflm doctor sweeps/runs/atat_staged.yaml
    difflm doctor spec.yaml --set train.lr=1e3      # FAILs: memorisation diverges

Prints one ``PASS|WARN|FAIL  check  explanation`` line per check and a summary; exits 1 on any
FAIL, 2 on a spec error (before any check runs), 0 otherwise. The checks live in orchestrator/doctor/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from orchestrator.cli.common import user_errors


@click.command()
@click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec field, e.g. train.lr=1e-3.")
@click.option("--verbose", is_flag=True, help="Also print data-preparation messages.")
@user_errors
def doctor(spec_file: Path, overrides: tuple[str, ...], verbose: bool) -> None:
    """Check SPEC_FILE before training: device, data, model size, loss scale, gradients, memorisation, ETA."""
    from orchestrator.doctor.report import exit_code, summary
    from orchestrator.doctor.run import run_doctor
    from orchestrator.spec.run import load_run_spec

    spec = load_run_spec(spec_file, list(overrides))
    click.echo(f"difflm doctor {spec_file}: {spec.model.family}, size {spec.model.size or 'custom'}, "
               f"{spec.train.max_steps:,} steps")
    start = time.perf_counter()
    log = (lambda m: click.echo(f"      {m}", err=True)) if verbose else (lambda _: None)
    checks = run_doctor(spec, emit=lambda c: click.echo(c.line()), log=log)
    click.echo(summary(checks, time.perf_counter() - start))
    sys.exit(exit_code(checks))
