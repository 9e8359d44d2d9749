"""CLI commands for sweeps: `difflm sweep`, `difflm results`, and the sweep half of `difflm resume`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from orchestrator.cli.common import PROFILE_HELP, debug_option, profile_defaults, user_errors
from orchestrator.errors import SpecError
from orchestrator.rundir.run_folder import SWEEP_STATE as STATE_FILE


def _finish(sweep_dir: Path) -> bool:
    """Print the ranked table and paths; return True when every expected trial has finished."""
    from orchestrator.sweep.results import expected_trials, load_sweep_meta, report

    table, trials = report(sweep_dir)
    meta = load_sweep_meta(sweep_dir)
    finished = [t for t in trials if t.status in ("TERMINATED", "FAILED")]
    complete = len(finished) >= expected_trials(meta)
    best = next((t for t in trials if t.is_best), None)
    lines = ["", table, ""]
    if best is not None:
        from orchestrator.sweep.spec import SEED_KEY

        seeds = [t.trial_id for t in trials if t.is_best]
        params = {k: v for k, v in best.params.items() if k != SEED_KEY}
        lines.append(f"best configuration {params} (trial(s) {', '.join(seeds)}); see the table for its value and step")
    lines += [
        f"results   {sweep_dir / 'results.csv'}  {sweep_dir / 'results.json'}",
        f"plots     {sweep_dir / 'val_nll_vs_step.png'}  {sweep_dir / 'params_vs_objective.png'}",
        f"TensorBoard  difflm tensorboard {sweep_dir}",
    ]
    click.echo("\n".join(lines))  # the result goes to stdout; progress went to stderr
    return complete


def _run(spec_file: Path, overrides: tuple[str, ...], resume: bool, address: str | None, profile: str | None,
         allow_spec_change: bool = False) -> None:
    from orchestrator.sweep.spec import load_sweep_file

    defaults, profile_note = profile_defaults(profile)
    sweep = load_sweep_file(str(spec_file), overrides, defaults=defaults)
    from orchestrator.train.console import TrainConsole
    from orchestrator.sweep.driver import run_sweep, sweep_dir_for

    console = TrainConsole()
    if profile_note:
        console.info(profile_note)
    sweep_dir = sweep_dir_for(sweep, str(spec_file))
    resume_cmd = f"difflm resume {sweep_dir}"
    interrupted = "\ninterrupted: trials stopped, state saved in {}\nresume with: {}"
    try:
        elapsed = run_sweep(
            sweep, str(spec_file), resume=resume, address=address, console=console, overrides=overrides, profile=profile,
            allow_spec_change=allow_spec_change,
        )
    except KeyboardInterrupt:
        click.echo(interrupted.format(sweep_dir, resume_cmd), err=True)
        sys.exit(130)
    if not _finish(sweep_dir):
        limit = sweep.sweep.budget.time_limit_s
        if limit is not None and elapsed >= limit:
            click.echo(f"\nstopped at the sweep's time limit ({limit:g} s); unfinished trials can go on with: {resume_cmd}", err=True)
        else:
            # Tune catches Ctrl-C itself, stops the trials and saves its state, then returns.
            click.echo(interrupted.format(sweep_dir, resume_cmd), err=True)
            sys.exit(130)


@click.command()
@click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field of the sweep file.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Parent folder for the sweep (output.dir).")
@click.option("--name", help="Sweep folder name (output.name; default: the sweep file's name).")
@click.option("--resume", is_flag=True, help="Continue an interrupted or killed sweep in its folder.")
@click.option("--allow-spec-change", is_flag=True, help="With --resume: accept a sweep file (or --set) that differs "
              "from the sweep's saved sweep.yaml beyond locations and cadence.")
@click.option("--address", help="Join an existing Ray cluster (HOST:PORT or 'auto') instead of starting one.")
@click.option("--profile", metavar="NAME|PATH", help=PROFILE_HELP)
@debug_option
@user_errors
def sweep(spec_file: Path, overrides: tuple[str, ...], output: Path | None, name: str | None, resume: bool,
          allow_spec_change: bool, address: str | None, profile: str | None) -> None:
    """Run a Ray Tune sweep described by SPEC_FILE (a run spec plus a `sweep:` section)."""
    extra = list(overrides)
    if output is not None:
        extra.append(f"output.dir={output}")
    if name is not None:
        extra.append(f"output.name={name}")
    _run(spec_file, tuple(extra), resume, address, profile, allow_spec_change)


def resume_sweep(sweep_dir: Path, address: str | None, profile: str | None = None, allow_spec_change: bool = False) -> None:
    """Continue the sweep in SWEEP_DIR (same as `difflm sweep SPEC --resume`); `difflm resume` calls it.
    ``profile`` replaces the profile the sweep started with."""
    state = sweep_dir / STATE_FILE
    if not state.exists():
        raise SpecError(f"{sweep_dir}: no sweep state here ({STATE_FILE}); give the folder `difflm sweep` printed")
    saved = json.loads(state.read_text())
    overrides = (
        *saved.get("overrides", []),
        f"output.dir={sweep_dir.resolve().parent}",
        f"output.name={sweep_dir.resolve().name}",
    )
    _run(Path(saved["spec_path"]), overrides, True, address, profile or saved.get("profile"), allow_spec_change)


@click.command()
@click.argument("sweep_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@user_errors
def results(sweep_dir: Path) -> None:
    """Print the ranked results table of SWEEP_DIR and rewrite its CSV/JSON/plots."""
    _finish(sweep_dir.resolve())
