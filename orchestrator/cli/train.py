"""`difflm train`, `difflm resume` and `difflm tensorboard`: run a spec as a Ray Train job, continue it, watch it.

    difflm train sweeps/runs/quickstart.yaml --set train.max_steps=200
    difflm resume runs/quickstart --set train.max_steps=400     # a run or a sweep folder
    difflm tensorboard runs/

Bad input (spec, overrides, data, resources, a run folder that already holds a run)
prints one message and exits 2, before Ray starts; a failure inside training exits 1
with one line: the worker's error (or that it died) and the path of its log.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.common import (
    DEBUG_HINT, PROFILE_HELP, debug_option, debug_enabled, profile_defaults, profile_overrides, show_traceback,
    user_errors,
)
from orchestrator.errors import SpecError


@click.command()
@click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec field, e.g. train.lr=1e-3.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Parent folder for the run (output.dir).")
@click.option("--name", help="Run folder name (output.name).")
@click.option("--address", help="Join an existing Ray cluster (e.g. 10.0.0.1:6379 or 'auto') instead of starting one.")
@click.option("--resume", is_flag=True, help="Continue the run already in the run folder (same as `difflm resume RUN_DIR`).")
@click.option("--allow-spec-change", is_flag=True, help="With --resume: accept a spec that differs from the run's "
              "spec.yaml beyond max_steps, cadence and locations.")
@click.option("--profile", metavar="NAME|PATH", help=PROFILE_HELP)
@debug_option
@user_errors
def train(spec_file: Path, overrides: tuple[str, ...], output: Path | None, name: str | None, address: str | None,
          resume: bool, allow_spec_change: bool, profile: str | None) -> None:
    """Train the run described by SPEC_FILE as a Ray Train + DeepSpeed job."""
    from orchestrator.spec.run import load_run_spec

    extra = list(overrides)
    if output is not None:
        extra.append(f"output.dir={output}")
    if name is not None:
        extra.append(f"output.name={name}")
    defaults, profile_note = profile_defaults(profile)
    spec = load_run_spec(spec_file, extra, defaults=defaults)
    _launch(spec, address, resume=resume, allow_spec_change=allow_spec_change, note=profile_note)


def _launch(spec: Any, address: str | None, *, resume: bool, allow_spec_change: bool, note: str | None = None) -> None:
    from orchestrator.train.console import TrainConsole
    from orchestrator.errors import TrainingStopped
    from orchestrator.train.failures import TrainingFailed
    from orchestrator.train.launch import launch_train

    console = TrainConsole()
    if note:
        console.info(note)
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"name": spec.run_name()})})  # fix the name
    try:
        result = launch_train(spec, address=address, console=console, resume=resume, allow_spec_change=allow_spec_change)
    except KeyboardInterrupt:
        run_dir = Path(spec.output.dir).expanduser().resolve() / spec.run_name()
        click.echo(f"\ninterrupted: training stopped; continue it with `difflm resume {run_dir}`", err=True)
        sys.exit(130)
    except SpecError:
        raise
    except TrainingStopped as exc:
        show_traceback(exc)
        click.echo(f"error: training stopped: {exc}", err=True)
        sys.exit(1)
    except TrainingFailed as exc:
        show_traceback(exc)
        click.echo(f"error: training failed: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # other failures arrive wrapped by Ray
        show_traceback(exc)
        click.echo(f"error: training failed: {_root_cause(exc)}{'' if debug_enabled() else DEBUG_HINT}", err=True)
        sys.exit(1)
    _print_summary(result)


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Runs only: change a field of the saved spec, e.g. train.max_steps=600.")
@click.option("--allow-spec-change", is_flag=True, help="Accept changes beyond max_steps, cadence and locations: a "
              "run's --set or --profile changes, a sweep's edited sweep file.")
@click.option("--address", help="Join an existing Ray cluster instead of starting one.")
@click.option("--profile", metavar="NAME|PATH", help="Scaling profile for this machine (a name in clusters/ or a "
              "file). A run: its fields replace the saved spec's (a change of workers, batch split or precision "
              "needs --allow-spec-change). A sweep: replaces the profile the sweep started with.")
@debug_option
@user_errors
def resume(directory: Path, overrides: tuple[str, ...], allow_spec_change: bool, address: str | None,
           profile: str | None) -> None:
    """Continue the run or sweep in DIRECTORY (a run folder, or a sweep folder) from its last checkpoint."""
    from orchestrator.rundir.run_folder import SPEC_FILE, holds_run
    from orchestrator.cli.sweep import STATE_FILE, resume_sweep

    directory = directory.expanduser().resolve()
    if (directory / STATE_FILE).is_file():
        if overrides:
            raise SpecError(f"{directory} is a sweep: --set applies to runs only (a sweep resumes its own sweep file)")
        resume_sweep(directory, address, profile=profile, allow_spec_change=allow_spec_change)
        return
    if not directory.is_dir() or not holds_run(directory):
        raise SpecError(
            f"{directory}: neither a run folder ({SPEC_FILE}, checkpoint_*) nor a sweep folder ({STATE_FILE}); "
            "give the folder `difflm train` or `difflm sweep` printed"
        )
    if not (directory / SPEC_FILE).is_file():
        raise SpecError(f"{directory / SPEC_FILE}: missing; resume with `difflm train SPEC --name "
                        f"{directory.name} --output {directory.parent} --resume`")
    from orchestrator.spec.run import load_run_spec

    # over the saved spec (it sets every field), under --set
    defaults, note = profile_defaults(profile, "replacing the run's spec.yaml values; --set overrides these")
    spec = load_run_spec(directory / SPEC_FILE, [
        *profile_overrides(defaults or {}), *overrides, f"output.dir={directory.parent}", f"output.name={directory.name}",
    ])
    _launch(spec, address, resume=True, allow_spec_change=allow_spec_change, note=note)


def _root_cause(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-1:] or [type(seen).__name__]
    return f"{type(seen).__name__}: {tail[0]}" if not tail[0].startswith(type(seen).__name__) else tail[0]


def _print_summary(result: Any) -> None:
    import math

    s = result.summary
    best = s.get("best_val_nll")
    lines = [
        "",
        "done.",
        f"  steps           {s.get('steps')}",
    ]
    if s.get("restarts"):
        lines.append(f"  restarts        {s['restarts']} (worker group restarted from its latest checkpoint)")
    if s.get("skipped_steps"):
        lines.append(f"  skipped steps   {s['skipped_steps']} (non-finite loss or gradient; no update applied)")
    if best is not None and math.isfinite(best):
        se = s.get("best_val_nll_se")
        pm = f" ± {se:.4f}" if isinstance(se, (int, float)) and math.isfinite(se) else ""
        ppl = f"{math.exp(min(best, 700)):.4g}"
        exact = bool(s.get("exact_likelihood"))  # ar: exact NLL; diffusion families: an upper bound
        lines += [
            f"  best val NLL    {best:.4f}{pm} nats/token ({best / math.log(2):.4f} bits/token)"
            + ("" if exact else ", an upper bound"),
            f"  perplexity      {ppl} (exact)" if exact else f"  perplexity <=   {ppl}",
        ]
    lines += [
        f"  best checkpoint {result.best_checkpoint}",
        f"  last checkpoint {result.last_checkpoint}",
        f"  run dir         {result.run_dir}",
        f"  TensorBoard     difflm tensorboard {result.run_dir}",
    ]
    click.echo("\n".join(lines))  # the result goes to stdout; progress went to stderr


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--port", default=6006, show_default=True, help="Port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
def tensorboard(directory: Path, port: int, host: str) -> None:
    """Start TensorBoard on a run or sweep directory."""
    exe = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    click.echo(f"TensorBoard on http://{host}:{port} for {directory} (Ctrl-C to stop)")
    try:
        subprocess.run([exe, "--logdir", str(directory), "--port", str(port), "--host", host], check=False)
    except KeyboardInterrupt:
        pass
