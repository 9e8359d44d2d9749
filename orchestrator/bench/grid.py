"""`difflm bench grid`: every grid point of a sweep file trained in-process to its full budget, then ranked.

    difflm bench grid sweeps/noise_schedules.yaml --set sweep.budget.max_steps=200 --set train.eval_every=25

No Ray, no DeepSpeed (plain PyTorch, :class:`~orchestrator.train.engine.TorchEngine`, one process, CPU):
the same trial specs as ``difflm sweep`` (base + grid values + linked values), the same
:class:`~orchestrator.train.runner.Runner` loop, validation and saved val draws, and the same
ranking as ``difflm results`` (configurations with ``sweep.seeds`` training seeds each, mean
val/nll ± SE at the last eval step, between-seed SD, difference to the family's best ± SE
paired over seeds and val draws, ties, verdict lines). It answers "which configuration is best at the full budget" on a
machine where running a Ray sweep is impractical, and it is deterministic. Not a timed test:
the markdown it prints goes to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import click


def grid_points(sweep: Any) -> list[dict[str, Any]]:
    """Every combination of the sweep's grid values (labels included); other domains are refused."""
    from orchestrator.errors import SpecError

    search = sweep.sweep.search
    bad = [p for p, d in search.items() if d.kind != "grid"]
    if bad:
        raise SpecError(f"bench grid runs grid domains only; {', '.join(bad)} is not a grid (use difflm sweep)")
    paths = list(search)
    return [dict(zip(paths, values)) for values in itertools.product(*(search[p].value for p in paths))]


def run_point(raw: dict[str, Any], out_dir: Path, threads: int) -> tuple[Any, float]:
    """Train one trial spec in-process; return (its best eval's ValDraws, wall seconds)."""
    import torch

    from difflm.data import prepare_data
    from difflm.evaluation import draws_path, load_val_draws
    from orchestrator.build import build_run
    from orchestrator.train.runner import WorkerContext
    from orchestrator.spec.run import spec_from_dict

    raw = {**raw, "scaling": {**raw["scaling"], "device": "cpu", "deepspeed": False, "zero_stage": 0, "num_workers": 1}}
    spec = spec_from_dict(raw, source=str(out_dir))
    torch.set_num_threads(threads)
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _m: None)
    cpu = torch.device("cpu")
    runner = build_run(spec, data, cpu, ctx=WorkerContext(0, 1, cpu), backend="torch", val_dir=out_dir / "val").runner
    assert runner is not None
    start = time.perf_counter()
    runner.run()
    wall = time.perf_counter() - start
    evals = [load_val_draws(p) for p in sorted((out_dir / "val").glob("step_*.npz"))]
    best = min(evals, key=lambda d: d.nll)
    assert draws_path(out_dir / "val", best.meta["step"]).is_file()  # type: ignore[index]
    return best, wall


@click.command()
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field of the sweep file.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/bench-grid"),
              show_default=True, help="Where each grid point's val draws go.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="torch threads (1 is fastest for tiny models on a shared CPU).")
def grid(sweep_file: Path, overrides: tuple[str, ...], output: Path, threads: int) -> None:
    """Train every grid point of SWEEP_FILE in-process to its full budget and rank them with standard errors."""
    from orchestrator.sweep.ranking import MIXED_NOTE, Candidate, fmt_diff, fmt_pm, fmt_sd, rank_candidates
    from orchestrator.sweep.results import trial_family
    from orchestrator.sweep.spec import load_sweep_file, trial_raw

    from difflm.evaluation import load_val_draws

    sweep = load_sweep_file(str(sweep_file), overrides)
    base, linked = sweep.base_raw(), sweep.sweep.linked
    meta = {**base, "sweep": {"linked": linked}}
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = output.resolve() / f"{sweep_file.stem}-{stamp}"
    points = grid_points(sweep)
    seeds = [base["train"]["seed"] + k for k in range(sweep.sweep.seeds)]  # seed k shared by every configuration
    cands: list[Candidate] = []
    walls: dict[str, float] = {}
    runs = [(params, seed) for params in points for seed in seeds]
    for i, (params, seed) in enumerate(runs):
        key = "-".join(f"{p.split('.')[-1]}={v}" for p, v in params.items())
        name = key + (f"-seed={seed}" if len(seeds) > 1 else "")
        click.echo(f"[{i + 1}/{len(runs)}] {name}", err=True)
        raw = trial_raw(base, params, linked)
        raw["train"]["seed"] = seed
        best, wall = run_point(raw, root / name, threads)
        walls[key] = walls.get(key, 0.0) + wall
        evals = {int(d.meta["step"]): d for d in (load_val_draws(p) for p in sorted((root / name / "val").glob("step_*.npz")))}
        cands.append(Candidate(name, trial_family(meta, params), best.nll, best.se, best, step=int(best.meta["step"]),
                               config=key, seed=seed, curve={s: (d.nll, d.se) for s, d in evals.items()},
                               draws_at=evals.get))
        click.echo(f"    best val/nll {fmt_pm(best.nll, best.se)} at step {best.meta['step']}, "  # type: ignore[index]
                   f"last {fmt_pm(evals[max(evals)].nll, evals[max(evals)].se)} at step {max(evals)}, {wall:.0f} s",
                   err=True)
    ranking = rank_candidates(cands, sweep.sweep.min_effect)
    t = base["train"]
    lines = [
        f"- Date: {_dt.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end; torch threads {threads}; command: `difflm bench grid {sweep_file}"
        + "".join(f" --set {o}" for o in overrides) + "`",
        f"- {len(points)} grid points x {len(seeds)} training seed(s) x {t['max_steps']} steps, eval every "
        f"{t['eval_every']} steps with {t['eval_samples']} val draws per sequence (seed {t['eval_seed']}); each "
        "configuration at its last eval step (mean over seeds)",
        "",
        "| rank | family | configuration | val/nll mean ± SE | seed SD | seeds | step | Δ to best ± SE | tied | wall s |"
        + (" overall (bounds differ) |" if ranking.mixed else ""),
        "|---|---|---|---|---|---:|---:|---|---|---:|" + ("---:|" if ranking.mixed else ""),
    ]
    for p in ranking.rows:
        c = p.cand
        lines.append(f"| {p.rank}{' (best)' if p.is_best else ''} | {c.family} | {c.key} | {fmt_pm(c.nll, c.se)} | "
                     f"{fmt_sd(c.sd, c.n_seeds)} | {c.n_seeds} | {c.step} | {fmt_diff(p)} | {'tied' if p.tied else ''} | "
                     f"{walls[c.key]:.0f} |" + (f" {p.overall} |" if ranking.mixed else ""))
    lines += [""] + ([MIXED_NOTE] if ranking.mixed else []) + ranking.verdicts
    if any(not math.isfinite(c.nll or math.nan) for c in cands):
        lines.append("(a trial without a finite val/nll is listed last)")
    lines.append(f"\nval draws: {root}")
    click.echo("\n".join(lines))
