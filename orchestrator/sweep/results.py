"""Sweep results: the ranked table (screen, CSV, JSON), TensorBoard HParams and PNG plots.

Everything is rebuilt from what is on disk (Tune's experiment state and each
trial's ``result.json``), so `difflm results DIR` gives the same table after the
fact, after a crash or while a resumed sweep is still running.

Why trials are ranked by the val NELBO: trials trained with different schedules
or likelihood weights optimise different training losses, so only a measure that
does not depend on those choices compares them. Every trial reports ``val/nll``
computed identically (same val blocks, the same val noise per sequence: common
random numbers, float64 sums / token count), never the training loss. The table
shows each trial's best val/nll ± its standard error and its difference to the
best ± the paired standard error, marks ties and ranks within each family
(:mod:`orchestrator.sweep.ranking`).
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

from difflm.atomic import atomic_path, atomic_write_text
from orchestrator.errors import SpecError
from orchestrator.sweep.ranking import MIXED_NOTE, Candidate, Ranking, draws_at, fmt_diff, fmt_pm, rank_candidates


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
    family: str = ""
    best_se: float | None = None
    best_step: int | None = None
    rank: int | None = None  # within the family; None: no score
    overall_rank: int | None = None
    diff_to_best: float | None = None
    diff_se: float | None = None
    paired: bool = False
    tied: bool = False


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


def trial_family(meta: dict[str, Any], params: dict[str, Any]) -> str:
    """The model family a trial ran: the base spec's, unless a searched or linked value set it."""
    from orchestrator.sweep.spec import trial_raw

    base = {k: v for k, v in meta.items() if k != "sweep"}
    try:
        raw = trial_raw(base, params, meta["sweep"].get("linked", {}))
    except Exception:  # a value the spec rejects: the trial failed anyway
        raw = base
    return str(raw.get("model", {}).get("family", "mdlm"))


def collect(sweep_dir: Path) -> tuple[dict[str, Any], list[TrialResult]]:
    """Read every trial of a sweep folder; rank them (within each family, best first, failures last)."""
    trials, _ = collect_ranked(sweep_dir)
    return trials


def collect_ranked(sweep_dir: Path) -> tuple[tuple[dict[str, Any], list[TrialResult]], Ranking]:
    """:func:`collect` plus the :class:`~orchestrator.sweep.ranking.Ranking` (verdict lines, mixed families)."""
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
    cands: dict[str, Candidate] = {}
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
        # Ray keeps the most recent checkpoints; the best by val/nll survives as the trial run's checkpoints/best
        best_link = tdir / "train" / "checkpoints" / "best"
        by_val_nll = metric == "val/nll" and mode == "min" and best_link.exists()
        best_ckpt = str(best_link.resolve()) if by_val_nll else (best_ckpt_row or {}).get("checkpoint_path")
        params = {k: v for k, v in trial.config.items()}
        best_step = int(best_row["step"]) if best_row and "step" in best_row else None
        best_se = best_row.get(f"{metric}_se") if best_row else None
        t = TrialResult(
            trial_id=trial.trial_id,
            params=params,
            status=status,
            best_metric=best_row[metric] if best_row else None,
            final_metric=last.get(metric),
            best_ppl=best_row.get("val/ppl") if best_row else None,
            final_ppl=last.get("val/ppl"),
            steps=steps,
            stopped_early=status == "TERMINATED" and 0 < steps < max_steps,
            wall_time_s=float(last.get("time_total_s", 0.0)),
            error=_error_text(tdir, trial) if status == "FAILED" else None,
            best_checkpoint=best_ckpt,
            trial_dir=str(tdir),
            history=[(int(r["step"]), float(r[metric])) for r in scored if "step" in r],
            family=trial_family(meta, params),
            best_se=float(best_se) if isinstance(best_se, (int, float)) else None,
            best_step=best_step,
        )
        out.append(t)
        # Paired errors only for the val NLL (other metrics have no per-sequence draws), lower = better.
        draws = draws_at(tdir / "train" / "val", best_step) if metric == "val/nll" and mode == "min" else None
        value = None if t.best_metric is None else sign * t.best_metric
        cands[t.trial_id] = Candidate(t.trial_id, t.family, value, t.best_se, draws)
    ranking = rank_candidates(list(cands.values()))
    order = {p.cand.key: i for i, p in enumerate(ranking.rows)}
    for p in ranking.rows:
        t = next(x for x in out if x.trial_id == p.cand.key)
        t.rank, t.overall_rank, t.is_best = p.rank, p.overall, p.is_best
        t.diff_to_best = None if p.diff is None else sign * p.diff
        t.diff_se, t.paired, t.tied = p.diff_se, p.paired, p.tied
    out.sort(key=lambda t: order[t.trial_id])
    return (meta, out), ranking


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


def markdown_table(meta: dict[str, Any], trials: list[TrialResult], mixed: bool = False) -> str:
    """Ranked table: rank in family, params, best metric ± SE, difference to the family's best ± paired SE, ties."""
    params = list(meta["sweep"]["search"])
    metric = meta["sweep"]["metric"]
    head = ["rank", "trial", *[p.split(".")[-1] for p in params], f"best {metric} ± SE", "Δ to best ± paired SE",
            "tied", "steps", "early stop", "wall s", "status", "best checkpoint"]
    if mixed:
        head[1:1] = ["family", "overall (bounds differ)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        status = t.status + (f": {t.error}" if t.error else "")
        rank = "-" if t.rank is None else f"{t.rank}{' (best)' if t.is_best else ''}"
        row = [rank, t.trial_id, *[_cell(t.params.get(p)) for p in params], fmt_pm(t.best_metric, t.best_se),
               _diff_cell(t), "tied" if t.tied else "", str(t.steps), "yes" if t.stopped_early else "no",
               f"{t.wall_time_s:.0f}", status.replace("|", "/"), t.best_checkpoint or "-"]
        if mixed:
            row[1:1] = [t.family, "-" if t.overall_rank is None else str(t.overall_rank)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _diff_cell(t: TrialResult) -> str:
    from orchestrator.sweep.ranking import Placed

    placed = Placed(Candidate(t.trial_id, t.family, t.best_metric, t.best_se), rank=t.rank,
                    diff=t.diff_to_best, diff_se=t.diff_se, paired=t.paired)
    return fmt_diff(placed)


def write_tables(sweep_dir: Path, meta: dict[str, Any], trials: list[TrialResult]) -> None:
    params = list(meta["sweep"]["search"])
    records = []
    for rank, t in enumerate(trials, 1):
        rec = {k: v for k, v in asdict(t).items() if k not in ("history", "params")}
        rec = {"rank": rank, **{p: t.params.get(p) for p in params}, **rec}
        records.append(rec)
    atomic_write_text(sweep_dir / "results.json", json.dumps(records, indent=2, default=str))
    with atomic_path(sweep_dir / "results.csv") as tmp, open(tmp, "w", newline="") as f:
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
            "hparams/best_val_nll_se": t.best_se,
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
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 4), squeeze=False)
    for ax, p in zip(axes[0], params):
        scored = [t for t in trials if t.best_metric is not None]
        pts = [(t.params.get(p), t.best_metric) for t in scored]
        errs = [t.best_se if t.best_se is not None and math.isfinite(t.best_se) else 0.0 for t in scored]
        if pts and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts):
            ax.errorbar([x for x, _ in pts], [y for _, y in pts], yerr=errs, fmt="o", capsize=3)
            if "log" in str(meta["sweep"]["search"][p]):
                ax.set_xscale("log")
        elif pts:
            cats = sorted({str(x) for x, _ in pts})
            ax.errorbar([cats.index(str(x)) for x, _ in pts], [y for _, y in pts], yerr=errs, fmt="o", capsize=3)
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
        ax.set_xlabel(p)
        ax.set_ylabel(f"best {metric} ± SE")
    fig.tight_layout()
    paths.append(sweep_dir / "params_vs_objective.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return paths


def report(sweep_dir: Path, *, write_hparams_data: bool = True) -> tuple[str, list[TrialResult]]:
    """Collect, write CSV/JSON/plots (+ HParams), return the markdown table with its verdict lines."""
    (meta, trials), ranking = collect_ranked(sweep_dir)
    write_tables(sweep_dir, meta, trials)
    write_plots(sweep_dir, meta, trials)
    if write_hparams_data:
        write_hparams(meta, trials)
    text = markdown_table(meta, trials, mixed=ranking.mixed)
    notes = ([MIXED_NOTE] if ranking.mixed else []) + ranking.verdicts
    return text + ("\n\n" + "\n".join(notes) if notes else ""), trials
