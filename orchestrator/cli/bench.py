"""`difflm bench`: measurements that belong in docs/benchmarks.md, never in timed tests.

    difflm bench [--family F] [--size S] [--seq-len L] [--batch B] [--precision P] [--device D]
                 [--steps N] [--rounds R] [--paths bare,torch,deepspeed,train] [--json] [--quick]
    difflm bench asha sweeps/noise_schedules.yaml --set sweep.budget.max_steps=200
    difflm bench grid sweeps/noise_schedules.yaml --set sweep.budget.max_steps=200   # in-process, no Ray
    difflm bench sampling runs/quickstart --steps 1000 --length 128
    difflm bench gpu     # make gpu-check: the GPU check, one report (skips in one line without CUDA)

Without a subcommand (or as ``difflm bench throughput``) it runs the training-throughput benchmark:
a bare PyTorch loop, difflm's loop in-process with each engine and the full `difflm train`, interleaved.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from orchestrator.bench.grid import grid
from orchestrator.cli.common import DENOISE_STEPS_HELP, DEVICES, TRAIN_STEPS_HELP, user_errors

PATH_NAMES = ("bare", "torch", "deepspeed", "train")


def _paths(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in names if p not in PATH_NAMES]
    if bad or not names:
        what = ", ".join(bad) if bad else repr(value)
        raise click.BadParameter(f"{what}: choose from {','.join(PATH_NAMES)} (comma-separated)")
    return names


def throughput_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The throughput benchmark's options, shared by `difflm bench` and `difflm bench throughput`."""
    options = [
        click.option("--family", default="mdlm", show_default=True, help="Model family."),
        click.option("--size", type=click.Choice(["tiny", "small", "base"]), default="small", show_default=True),
        click.option("--seq-len", type=click.IntRange(8), default=256, show_default=True),
        click.option("--batch", type=click.IntRange(1), default=8, show_default=True, help="Sequences per step."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="auto: what `difflm train` picks on this device (train.precision: auto)."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True),
        click.option("--steps", type=click.IntRange(1), default=20, show_default=True,
                     help=f"Optimizer steps timed per path and round. {TRAIN_STEPS_HELP}."),
        click.option("--warmup", type=click.IntRange(1), default=3, show_default=True,
                     help="Untimed steps first (the first step included)."),
        click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
                     help="Interleaved rounds; tokens/s is the median over rounds."),
        click.option("--paths", default=",".join(PATH_NAMES), show_default=True, callback=_paths,
                     help="Which paths to run, comma-separated."),
        click.option("--data", default="builtin", show_default=True,
                     help="builtin, or a text file/folder (e.g. ../shared/data/wikitext-2/valid.txt)."),
        click.option("--vocab", type=click.IntRange(0), default=8192, show_default=True,
                     help="BPE vocab size trained on the data; 0 = byte tokenizer."),
        click.option("--threads", type=click.IntRange(1), default=None,
                     help="CPU threads (torch here, cpus_per_worker for `difflm train`); default: all CPUs."),
        click.option("--zero-stage", type=click.IntRange(0, 3), default=2, show_default=True),
        click.option("--output", type=click.Path(file_okay=False), default="runs/bench", show_default=True,
                     help="Where the `difflm train` runs and report.json go."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of markdown."),
        click.option("--quick", is_flag=True,
                     help="Smoke run of every path: tiny model, byte tokenizer, 2 steps, 1 round (CI shape check)."),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(options), fn)


def _run_throughput(as_json: bool, quick: bool, **kwargs: Any) -> None:
    from orchestrator.bench.report import format_markdown
    from orchestrator.bench.throughput import ThroughputConfig, run_throughput

    command = "difflm bench " + shlex.join(sys.argv[sys.argv.index("bench") + 1:]) if "bench" in sys.argv else "difflm bench"
    kwargs["command"] = command.strip()
    if quick:
        keep = ("family", "device", "precision", "paths", "output", "threads", "zero_stage", "command")
        explicit = {k: v for k, v in kwargs.items() if k in keep}
        cfg = ThroughputConfig.quick_preset(**explicit)
    else:
        cfg = ThroughputConfig(**kwargs)
    with _stdout_to_stderr():  # DeepSpeed and Ray print to stdout; stdout carries only the report
        report = run_throughput(cfg)
    click.echo(json.dumps(report, indent=2) if as_json else format_markdown(report))


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for the duration (covers C extensions and captured streams)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@click.group(invoke_without_command=True)
@throughput_options
@click.pass_context
@user_errors
def bench(ctx: click.Context, **kwargs: Any) -> None:
    """Benchmarks (results go to docs/benchmarks.md). Without a subcommand: training throughput."""
    if ctx.invoked_subcommand is None:
        _run_throughput(**kwargs)


@bench.command()
@throughput_options
@user_errors
def throughput(**kwargs: Any) -> None:
    """Training throughput: bare PyTorch loop vs difflm in-process (each engine) vs `difflm train`."""
    _run_throughput(**kwargs)


@bench.command()
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field of the sweep file.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/bench"), show_default=True)
@user_errors
def asha(sweep_file: Path, overrides: tuple[str, ...], output: Path) -> None:
    """Compute ASHA saves on SWEEP_FILE against running every trial to the full budget."""
    from orchestrator.bench.asha import asha_report

    click.echo(asha_report(sweep_file, overrides, output))


@bench.command()
@click.argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
@click.option("--steps", type=click.IntRange(1), default=1000, show_default=True, help=f"{DENOISE_STEPS_HELP}.")
@click.option("--length", type=click.IntRange(1), default=128, show_default=True, help="Tokens per sample.")
@click.option("--num", type=click.IntRange(1), multiple=True, help="Samples per batch; repeat for several (default 1).")
@click.option("--repeats", type=click.IntRange(1), default=2, show_default=True,
              help="Rounds per sampler; the best time counts.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1), help="torch.set_num_threads (CPU); default: torch's choice.")
@click.option("--setting", "settings", multiple=True, metavar="K=V[,K=V...]",
              help="A trade-off setting; repeat for several. Keys: sampler, remasking (random|low_confidence|threshold), "
              "threshold, block (block length), cache (none|prefix|dual), steps (L = the length; per block with block decoding and for bd3lm), e.g. "
              "threshold=0.9,block=32,cache=dual. Default: a masked family's standard set (the first is the quality "
              "reference: one token per step).")
@click.option("--judge", metavar="AR_RUN_OR_HF_DIR", help="Score each setting's samples by gen-PPL + entropy under this causal LM instead of agreement with the first setting's tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), help="Sampling temperature of the trade-off settings (default: 0 for agreement, 1 with --judge).")
@click.option("--plot", type=click.Path(dir_okay=False), help="PNG of the frontier (default: RUN/eval/sampling_frontier.png).")
@click.option("--compare-cache/--no-compare-cache", default=True, show_default=True, help="Also print the ddpm vs ddpm_cache table.")
@user_errors
def sampling(checkpoint: str, steps: int, length: int, num: tuple[int, ...], repeats: int, seed: int, device: str,
             threads: int | None, settings: tuple[str, ...], judge: str | None, temperature: float | None,
             plot: str | None, compare_cache: bool) -> None:
    """Sampling speed against quality on one checkpoint: per setting tokens/s, NFE per token and a quality figure
    (agreement with the reference setting, or gen-PPL under --judge), as a table and a PNG frontier; plus
    ddpm_cache vs ddpm (best wall time, network calls, same tokens)."""
    from orchestrator.bench.sampling import SamplingBench, run_sampling_bench

    sys.exit(run_sampling_bench(SamplingBench(checkpoint, steps, length, list(num) or [1], repeats, seed, device, threads,
                                              list(settings), judge, temperature, plot, compare_cache)))


@bench.command()
@user_errors
def gpu() -> None:
    """The GPU check (`make gpu-check`): doctor, train 1 and 2 workers, bench, sampling, a sweep; one report.
    Without CUDA: one line, exit 0."""
    from orchestrator.bench.gpu import run_gpu_check

    sys.exit(run_gpu_check())


# grid's click command lives with its logic in orchestrator/bench/grid.py; user errors exit 2 like the others
grid.callback = user_errors(grid.callback)
bench.add_command(grid)
