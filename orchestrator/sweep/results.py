"""Sweep results: the ranked table (screen, CSV, JSON), TensorBoard HParams and PNG plots.

Everything is rebuilt from what is on disk (Tune's experiment state and each
trial's ``result.json``), so `difflm results DIR` gives the same table after the
fact, after a crash or while a resumed sweep is still running.

Why trials are ranked by the val NELBO: trials trained with different schedules
or likelihood weights optimise different training losses, so only a measure that
does not depend on those choices compares them. Every trial reports ``val/nll``
computed identically (same val blocks, same eval seed, float64 sum / token
count), never the training loss.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SpecError


@dataclass
class TrialResult:
    trial_id: str
    params: dict[str, Any]
    status: str
    best_metric: float | None
    final_metric: float | None
    best_ppl: float | None
    final_ppl: float | None
    steps: int
    stopped_early: bool
    wall_time_s: float
    error: str | None
    best_checkpoint: str | None
    trial_dir: str
    history: list[tuple[int, float]] = field(default_factory=list, repr=False)
    is_best: bool = False


def read_results(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
    return rows


def _error_text(trial_dir: Path, trial: Any) -> str | None:
    """The last informative line of the trial's error.txt (Tune writes the traceback there)."""
    p = trial_dir / "error.txt"
    if p.exists():
        lines = [ln.strip() for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
        useful = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^", "~"))]
        return (useful or lines or ["unknown error"])[-1][:300]
    msg = getattr(trial, "error_msg", None)
    return str(msg).strip().splitlines()[-1][:300] if msg else None


def load_sweep_meta(sweep_dir: Path) -> dict[str, Any]:
    p = sweep_dir / "sweep.yaml"
    if not p.exists():
        raise SpecError(f"{sweep_dir}: not a sweep folder (no sweep.yaml); give the folder `difflm sweep` printed")
    return yaml.safe_load(p.read_text())


def collect(sweep_dir: Path) -> tuple[dict[str, Any], list[TrialResult]]:
    """Read every trial of a sweep folder; rank them by the objective (best first, failures last)."""
    from ray.tune import ExperimentAnalysis

    meta = load_sweep_meta(sweep_dir)
    cfg = meta["sweep"]
    metric, mode = cfg["metric"], cfg["mode"]
    max_steps = cfg["budget"]["max_steps"] or meta["train"]["max_steps"]
    try:
        analysis = ExperimentAnalysis(str(sweep_dir))
    except Exception as exc:  # no experiment state yet
        raise SpecError(f"{sweep_dir}: no Tune experiment state to read ({type(exc).__name__}: {exc})") from None
    sign = 1.0 if mode == "min" else -1.0
    out: list[TrialResult] = []
    for trial in analysis.trials:
        tdir = Path(trial.path) if trial.path else sweep_dir / str(trial.trial_id)
        rows = read_results(tdir / "result.json")
        scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        best_row = min(scored, key=lambda r: sign * r[metric]) if scored else None
        last = rows[-1] if rows else {}
        steps = int(max((r.get("step", 0) for r in rows), default=0))
        status = "FAILED" if trial.status == "ERROR" else trial.status
        ckpts = [r for r in rows if r.get("checkpoint_path") and Path(r["checkpoint_path"]).exists()]
        best_ckpt_row = min(ckpts, key=lambda r: sign * r.get(metric, math.inf)) if ckpts else None
        out.append(
            TrialResult(
                trial_id=trial.trial_id,
                params={k: v for k, v in trial.config.items()},
                status=status,
                best_metric=best_row[metric] if best_row else None,
                final_metric=last.get(metric),
                best_ppl=best_row.get("val/ppl") if best_row else None,
                final_ppl=last.get("val/ppl"),
                steps=steps,
                stopped_early=status == "TERMINATED" and 0 < steps < max_steps,
                wall_time_s=float(last.get("time_total_s", 0.0)),
                error=_error_text(tdir, trial) if status == "FAILED" else None,
                best_checkpoint=best_ckpt_row["checkpoint_path"] if best_ckpt_row else None,
                trial_dir=str(tdir),
                history=[(int(r["step"]), float(r[metric])) for r in scored if "step" in r],
            )
        )
    out.sort(key=lambda t: (t.best_metric is None, sign * (t.best_metric if t.best_metric is not None else 0.0)))
    if out and out[0].best_metric is not None:
        out[0].is_best = True
    return meta, out


def expected_trials(meta: dict[str, Any]) -> int:
    """Trials a complete sweep has: num_samples x the product of grid sizes."""
    n = int(meta["sweep"]["num_samples"])
    for domain in meta["sweep"]["search"].values():
        if domain.get("grid") is not None:
            n *= len(domain["grid"])
    return n


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(meta: dict[str, Any], trials: list[TrialResult]) -> str:
    params = list(meta["sweep"]["search"])
    metric = meta["sweep"]["metric"]
    head = ["rank", "trial", *[p.split(".")[-1] for p in params], f"best {metric}", "steps", "early stop",
            "wall s", "status", "best checkpoint"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(trials, 1):
        status = t.status + (f": {t.error}" if t.error else "")
        row = [f"{i}{' (best)' if t.is_best else ''}", t.trial_id, *[_cell(t.params.get(p)) for p in params],
               _cell(t.best_metric), str(t.steps), "yes" if t.stopped_early else "no", f"{t.wall_time_s:.0f}",
               status.replace("|", "/"), t.best_checkpoint or "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_tables(sweep_dir: Path, meta: dict[str, Any], trials: list[TrialResult]) -> None:
    params = list(meta["sweep"]["search"])
    records = []
    for rank, t in enumerate(trials, 1):
        rec = {k: v for k, v in asdict(t).items() if k not in ("history", "params")}
        rec = {"rank": rank, **{p: t.params.get(p) for p in params}, **rec}
        records.append(rec)
    (sweep_dir / "results.json").write_text(json.dumps(records, indent=2, default=str))
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["rank"])
        writer.writeheader()
        writer.writerows(records)


def write_hparams(meta: dict[str, Any], trials: list[TrialResult]) -> None:
    """One HParams session per trial under <trial>/tensorboard/hparams (rewritten each time)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    for t in trials:
        hp_dir = Path(t.trial_dir) / "tensorboard" / "hparams"
        if hp_dir.exists():
            shutil.rmtree(hp_dir)
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in t.params.items()}
        metrics = {
            "hparams/best_val_nll": t.best_metric,
            "hparams/final_val_nll": t.final_metric,
            "hparams/best_val_ppl": t.best_ppl,
            "hparams/final_val_ppl": t.final_ppl,
        }
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        writer = SummaryWriter(str(hp_dir))
        exp, ssi, sei = hparams(hp, {k: 0.0 for k in metrics} or {"hparams/best_val_nll": 0.0})
        fw = writer._get_file_writer()
        fw.add_summary(exp)
        fw.add_summary(ssi)
        fw.add_summary(sei)
        for k, v in metrics.items():
            writer.add_scalar(k, v, t.steps)
        writer.close()


def write_plots(sweep_dir: Path, meta: dict[str, Any], trials: list[TrialResult]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = meta["sweep"]["metric"]
    params = list(meta["sweep"]["search"])
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for t in trials:
        if t.history:
            xs, ys = zip(*sorted(t.history))
            label = ", ".join(f"{p.split('.')[-1]}={_cell(t.params.get(p))}" for p in params)
            ax.plot(xs, ys, marker="o", markersize=3, label=label + (" (best)" if t.is_best else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title("val NLL per trial")
    if any(t.history for t in trials):
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(sweep_dir / "val_nll_vs_step.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 4), squeeze=False)
    for ax, p in zip(axes[0], params):
        pts = [(t.params.get(p), t.best_metric) for t in trials if t.best_metric is not None]
        if pts and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts):
            ax.scatter([x for x, _ in pts], [y for _, y in pts])
            if "log" in str(meta["sweep"]["search"][p]):
                ax.set_xscale("log")
        elif pts:
            cats = sorted({str(x) for x, _ in pts})
            ax.scatter([cats.index(str(x)) for x, _ in pts], [y for _, y in pts])
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
        ax.set_xlabel(p)
        ax.set_ylabel(f"best {metric}")
    fig.tight_layout()
    paths.append(sweep_dir / "params_vs_objective.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def report(sweep_dir: Path, *, write_hparams_data: bool = True) -> tuple[str, list[TrialResult]]:
    """Collect, write CSV/JSON/plots (+ HParams), return the markdown table."""
    meta, trials = collect(sweep_dir)
    write_tables(sweep_dir, meta, trials)
    write_plots(sweep_dir, meta, trials)
    if write_hparams_data:
        write_hparams(meta, trials)
    return markdown_table(meta, trials), trials
