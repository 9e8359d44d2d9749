"""Benchmark: ``ddpm_cache`` against ``ddpm`` on one checkpoint, side by side in one process.

    difflm bench sampling runs/quickstart --steps 1000 --length 128 --num 1 --num 4

(the options live on the click command in orchestrator/cli/bench.py, so ``--help`` lists them).

For each batch size the two samplers run with the same seed, alternating order over
``--repeats`` rounds (so drifting machine load hits both alike); the best wall time of each
is reported with the speed-up and the network calls, and the tokens are checked to be
identical. Not a timed test: the numbers go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass

import torch

from orchestrator.devices import synchronize


def _time_one(sampler, options, seed: int, device: torch.device):  # type: ignore[no-untyped-def]
    gen = torch.Generator(device=device).manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = sampler(options, gen)
    synchronize(device)
    return time.perf_counter() - start, out


@dataclass(frozen=True)
class SamplingBench:
    """What ``difflm bench sampling`` was asked (its click options)."""

    checkpoint: str
    steps: int
    length: int
    num: list[int]
    repeats: int
    seed: int
    device: str
    threads: int | None


def run_sampling_bench(args: SamplingBench) -> int:
    """Print the markdown table; 0, or 2 for a checkpoint this benchmark cannot load."""
    from difflm.sampling import SampleOptions, get_sampler
    from orchestrator.rundir.checkpoints import load_checkpoint
    from orchestrator.errors import SpecError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ckpt = load_checkpoint(args.checkpoint, args.device)
        samplers = {name: get_sampler(ckpt.model, name) for name in ("ddpm", "ddpm_cache")}
    except (SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint {ckpt.describe()}, {ckpt.model.num_parameters():,} parameters")
    print(f"machine    {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"device {ckpt.device}")
    print(f"settings   T = {args.steps} steps, L = {args.length}, seed {args.seed}, best of {args.repeats}")
    print("")
    print("| samples | ddpm s | ddpm calls | ddpm_cache s | ddpm_cache calls | speed-up | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    for num in args.num:
        options = SampleOptions(num=num, length=args.length, steps=args.steps)
        best: dict[str, float] = {}
        tokens: dict[str, torch.Tensor] = {}
        calls: dict[str, int] = {}
        order = ["ddpm", "ddpm_cache"]
        for r in range(args.repeats):
            for name in order if r % 2 == 0 else order[::-1]:
                seconds, out = _time_one(samplers[name], options, args.seed, ckpt.device)
                best[name] = min(best.get(name, float("inf")), seconds)
                tokens[name], calls[name] = out.tokens.cpu(), out.nfe
        same = torch.equal(tokens["ddpm"], tokens["ddpm_cache"])
        print(f"| {num} | {best['ddpm']:.2f} | {calls['ddpm']} | {best['ddpm_cache']:.2f} | {calls['ddpm_cache']} | "
              f"{best['ddpm'] / best['ddpm_cache']:.1f}x | {'yes' if same else 'NO'} |", flush=True)
    return 0

