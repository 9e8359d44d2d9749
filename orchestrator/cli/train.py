"""`difflm train` and `difflm tensorboard`: run a spec as a Ray Train job and watch it.

    difflm train sweeps/runs/quickstart.yaml --set train.max_steps=200
    difflm tensorboard runs/

Bad input (spec, overrides, data, resources) prints one message and exits 2,
before Ray starts; a failure inside training exits 1 with the worker's error.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.common import PROFILE_HELP, profile_defaults, user_errors
from orchestrator.errors import SpecError


@click.command()
@click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec field, e.g. train.lr=1e-3.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Parent folder for the run (output.dir).")
@click.option("--name", help="Run folder name (output.name).")
@click.option("--address", help="Join an existing Ray cluster (e.g. 10.0.0.1:6379 or 'auto') instead of starting one.")
@click.option("--profile", metavar="NAME|PATH", help=PROFILE_HELP)
@user_errors
def train(
    spec_file: Path, overrides: tuple[str, ...], output: Path | None, name: str | None, address: str | None,
    profile: str | None,
) -> None:
    """Train the run described by SPEC_FILE as a Ray Train + DeepSpeed job."""
    from orchestrator.spec.run import load_run_spec

    extra = list(overrides)
    if output is not None:
        extra.append(f"output.dir={output}")
    if name is not None:
        extra.append(f"output.name={name}")
    defaults, profile_note = profile_defaults(profile)
    spec = load_run_spec(spec_file, extra, defaults=defaults)

    from orchestrator.train.console import TrainConsole
    from orchestrator.train.launch import launch_train

    console = TrainConsole()
    if profile_note:
        console.info(profile_note)
    try:
        result = launch_train(spec, address=address, console=console)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: training stopped.", err=True)
        sys.exit(130)
    except SpecError:
        raise
    except Exception as exc:  # worker failures arrive wrapped by Ray
        click.echo(f"error: training failed: {_root_cause(exc)}", err=True)
        sys.exit(1)
    _print_summary(result)


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
