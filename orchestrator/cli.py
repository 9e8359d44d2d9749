"""The ``difflm`` command line.

    difflm train sweeps/runs/quickstart.yaml --set train.max_steps=200
    difflm resume runs/quickstart --set train.max_steps=400     # a run or a sweep folder
    difflm validate sweeps/*.yaml sweeps/runs/*.yaml
    difflm schema > spec.schema.json
    difflm tensorboard runs/

Bad input (spec, overrides, data, resources, a run folder that already holds a run)
prints one message and exits 2, before Ray starts; a failure inside training exits 1
with one line: the worker's error (or that it died) and the path of its log.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import click

from orchestrator.errors import SpecError


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map the errors a user can fix to one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from difflm.data import DataError

        try:
            return fn(*args, **kwargs)
        except (SpecError, DataError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="difflm")
def main() -> None:
    """difflm: train, sweep and compare text diffusion language models."""


@main.command()
@click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec field, e.g. train.lr=1e-3.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Parent folder for the run (output.dir).")
@click.option("--name", help="Run folder name (output.name).")
@click.option("--address", help="Join an existing Ray cluster (e.g. 10.0.0.1:6379 or 'auto') instead of starting one.")
@click.option("--resume", is_flag=True, help="Continue the run already in the run folder (same as `difflm resume RUN_DIR`).")
@click.option("--allow-spec-change", is_flag=True, help="With --resume: accept a spec that differs from the run's "
              "spec.yaml beyond max_steps, cadence and locations.")
@_user_errors
def train(spec_file: Path, overrides: tuple[str, ...], output: Path | None, name: str | None, address: str | None,
          resume: bool, allow_spec_change: bool) -> None:
    """Train the run described by SPEC_FILE as a Ray Train + DeepSpeed job."""
    from orchestrator.spec import load_run_spec

    extra = list(overrides)
    if output is not None:
        extra.append(f"output.dir={output}")
    if name is not None:
        extra.append(f"output.name={name}")
    spec = load_run_spec(spec_file, extra)
    _launch(spec, address, resume=resume, allow_spec_change=allow_spec_change)


def _launch(spec: Any, address: str | None, *, resume: bool, allow_spec_change: bool) -> None:
    from orchestrator.console import TrainConsole
    from orchestrator.errors import TrainingStopped
    from orchestrator.failures import TrainingFailed
    from orchestrator.launch import launch_train

    console = TrainConsole()
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
        click.echo(f"error: training stopped: {exc}", err=True)
        sys.exit(1)
    except TrainingFailed as exc:
        click.echo(f"error: training failed: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # other failures arrive wrapped by Ray
        click.echo(f"error: training failed: {_root_cause(exc)}", err=True)
        sys.exit(1)
    _print_summary(result)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Runs only: change a field of the saved spec, e.g. train.max_steps=600.")
@click.option("--allow-spec-change", is_flag=True, help="Runs only: accept --set changes beyond max_steps, cadence "
              "and locations.")
@click.option("--address", help="Join an existing Ray cluster instead of starting one.")
@_user_errors
def resume(directory: Path, overrides: tuple[str, ...], allow_spec_change: bool, address: str | None) -> None:
    """Continue the run or sweep in DIRECTORY (a run folder, or a sweep folder) from its last checkpoint."""
    from orchestrator.run_folder import SPEC_FILE, holds_run
    from orchestrator.sweep_cli import STATE_FILE, resume_sweep

    directory = directory.expanduser().resolve()
    if (directory / STATE_FILE).is_file():
        if overrides or allow_spec_change:
            raise SpecError(f"{directory} is a sweep: --set and --allow-spec-change apply to runs only")
        resume_sweep(directory, address)
        return
    if not directory.is_dir() or not holds_run(directory):
        raise SpecError(
            f"{directory}: neither a run folder ({SPEC_FILE}, checkpoint_*) nor a sweep folder ({STATE_FILE}); "
            "give the folder `difflm train` or `difflm sweep` printed"
        )
    if not (directory / SPEC_FILE).is_file():
        raise SpecError(f"{directory / SPEC_FILE}: missing; resume with `difflm train SPEC --name "
                        f"{directory.name} --output {directory.parent} --resume`")
    from orchestrator.spec import load_run_spec

    spec = load_run_spec(directory / SPEC_FILE, [*overrides, f"output.dir={directory.parent}", f"output.name={directory.name}"])
    _launch(spec, address, resume=True, allow_spec_change=allow_spec_change)


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
        lines += [
            f"  best val NLL    {best:.4f} nats/token ({best / math.log(2):.4f} bits/token)",
            f"  perplexity <=   {math.exp(min(best, 700)):.4g}",
        ]
    lines += [
        f"  best checkpoint {result.best_checkpoint}",
        f"  last checkpoint {result.last_checkpoint}",
        f"  run dir         {result.run_dir}",
        f"  TensorBoard     difflm tensorboard {result.run_dir}",
    ]
    click.echo("\n".join(lines))  # the result goes to stdout; progress went to stderr


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Apply overrides before validating.")
def validate(files: tuple[Path, ...], overrides: tuple[str, ...]) -> None:
    """Check spec files (run or sweep); print each problem, exit 2 if any file is bad."""
    from orchestrator.specs import validate_file

    bad = 0
    for f in files:
        try:
            kind = validate_file(f, list(overrides))
            click.echo(f"ok: {f} ({kind} spec)")
        except SpecError as exc:
            bad += 1
            click.echo(f"error: {exc}", err=True)
    if bad:
        sys.exit(2)


@main.command()
@click.option("--sweep", is_flag=True, help="Print the sweep-file schema instead of the run spec's.")
def schema(sweep: bool) -> None:
    """Print the JSON Schema of the run spec (for editor completion)."""
    from orchestrator.specs import json_schema

    click.echo(json.dumps(json_schema(sweep=sweep), indent=2))


@main.command()
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


# ---- commands defined in other modules (kept out of this file to keep it small) ----
from orchestrator import sweep_cli  # noqa: E402
from orchestrator.bench import bench  # noqa: E402
from orchestrator.eval_cli import denoise, eval_cmd, sample  # noqa: E402

for _cmd in (sample, eval_cmd, denoise):
    main.add_command(_cmd)
for _cmd in (sweep_cli.sweep, sweep_cli.results, *bench.commands.values()):
    _cmd.callback = _user_errors(_cmd.callback)
for _cmd in (sweep_cli.sweep, sweep_cli.results, bench):
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
