"""`difflm bench asha`: the compute ASHA saves on a sweep file (for docs/benchmarks.md, never a timed test).

    difflm bench asha sweeps/noise_schedules.yaml --set sweep.budget.max_steps=200

It runs one sweep file twice in one Ray session — once as written (ASHA) and
once with ``sweep.scheduler.kind=none`` — and reports the compute ASHA saved (optimizer
steps and tokens over all trials, and trial wall time) and whether both runs pick the
same best configuration (and both ranked tables, with standard errors and ties). It prints a
markdown block to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any


def _sweep_totals(sweep_dir: Path) -> dict[str, Any]:
    from orchestrator.sweep.results import collect

    meta, trials = collect(sweep_dir)
    tokens_per_step = (
        meta["train"]["micro_batch_size"] * meta["train"]["grad_accum"] * meta["scaling"]["num_workers"] * meta["data"]["seq_len"]
    )
    best = next((t for t in trials if t.is_best), None)
    return {
        "trials": len(trials),
        "steps": sum(t.steps for t in trials),
        "tokens": sum(t.steps for t in trials) * tokens_per_step,
        "wall_s": sum(t.wall_time_s for t in trials),
        "stopped_early": sum(t.stopped_early for t in trials),
        "best_params": best.params if best else None,
        "best_metric": best.best_metric if best else None,
        "ranking": [(t.params, t.best_metric) for t in trials],
    }


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def asha_report(sweep_file: Path, overrides: tuple[str, ...], output: Path) -> str:
    """Run SWEEP_FILE with ASHA and at full budget; return the markdown block for docs/benchmarks.md."""
    from orchestrator.train.console import TrainConsole
    from orchestrator.sweep.driver import run_sweep
    from orchestrator.sweep.results import report
    from orchestrator.sweep.spec import load_sweep_file

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    console = TrainConsole()
    totals: dict[str, dict[str, Any]] = {}
    for label, extra in (("asha", ()), ("full", ("sweep.scheduler.kind=none",))):
        name = f"{sweep_file.stem}-{label}-{stamp}"
        sets = (*overrides, *extra, f"output.dir={output.resolve()}", f"output.name={name}")
        sweep = load_sweep_file(str(sweep_file), sets)
        console.info(f"== {label}: {output / name}")
        run_sweep(sweep, str(sweep_file), resume=False, address=None, console=console, overrides=sets)
        totals[label] = _sweep_totals(output.resolve() / name)
    a, f = totals["asha"], totals["full"]
    same = a["best_params"] == f["best_params"]
    lines = [
        f"- Date: {_dt.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{'CUDA' if _has_cuda() else 'no GPU'}; command: `difflm bench asha {sweep_file}"
        + "".join(f" --set {o}" for o in overrides) + "`",
        "",
        "| run | trials | stopped early | optimizer steps | tokens | trial wall time (s) | best | best val/nll |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for label, t in (("ASHA", a), ("full budget", f)):
        lines.append(
            f"| {label} | {t['trials']} | {t['stopped_early']} | {t['steps']:,} | {t['tokens']:,} | {t['wall_s']:.0f} | "
            f"{t['best_params']} | {'-' if t['best_metric'] is None else format(t['best_metric'], '.4f')} |"
        )
    saved = 1 - a["steps"] / max(1, f["steps"])
    lines += [
        "",
        f"ASHA ran {a['steps']:,} of {f['steps']:,} optimizer steps ({saved:.0%} saved; trial wall time "
        f"{a['wall_s']:.0f} s against {f['wall_s']:.0f} s, {1 - a['wall_s'] / max(1e-9, f['wall_s']):.0%} saved) and "
        + ("picked the same best configuration." if same else f"picked {a['best_params']} instead of {f['best_params']}."),
        "",
        "Full-budget ranking: " + "; ".join(f"{p} {m:.4f}" for p, m in f["ranking"] if m is not None),
    ]
    for label, name in (("ASHA", "asha"), ("full budget", "full")):
        table, _ = report(output.resolve() / f"{sweep_file.stem}-{name}-{stamp}", write_hparams_data=False)
        lines += ["", f"{label} (`difflm results`):", "", table]
    return "\n".join(lines)
