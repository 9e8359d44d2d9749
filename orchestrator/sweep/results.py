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
from orchestrator.sweep.ranking import (
    MIXED_NOTE,
    Candidate,
    Ranking,
    draws_at,
    fmt_diff,
    fmt_pm,
    fmt_sd,
    rank_candidates,
)


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


@dataclass
class ConfigResult:
    """One configuration (its seeds grouped): the row of the results table, CSV and JSON."""

    config: str
    params: dict[str, Any]
    family: str
    trials: list[str]
    seeds: list[int | None]
    n_seeds: int
    step: int | None  # the step its value (mean over seeds) was taken at: its last common eval step
    val_nll_mean: float | None
    val_nll_se: float | None
    seed_sd: float | None
    per_seed: list[float | None]
    rank: int | None
    overall_rank: int | None
    is_best: bool
    diff_to_best: float | None
    diff_se: float | None
    diff_at_step: int | None
    paired: bool
    seeds_paired: int
    tied: bool
    why_tied: str
    full_budget: bool
    stopped_early: bool
    steps: int
    status: str
    wall_time_s: float
    error: str | None
    best_checkpoint: str | None
    trial_dir: str
    # Sample quality from `difflm eval TRIAL_RUN --gen-ppl` (RUN_DIR/eval/sample_quality.json), mean over the
    # configuration's trials that have it (see attach_sample_quality); None when no trial was evaluated.
    gen_ppl: float | None = None
    gen_ppl_se: float | None = None
    entropy: float | None = None
    entropy_se: float | None = None
    gen_steps: int | None = None
    gen_judge: str | None = None
    gen_sample_dtype: str | None = None
    gen_trials: int = 0


def _trial_seed(params: dict[str, Any], meta: dict[str, Any]) -> int | None:
    """The training seed a trial ran with: the replicate grid's, else the base spec's."""
    from orchestrator.sweep.spec import trial_seed

    base = meta.get("train", {}).get("seed")
    return trial_seed(params, base) if isinstance(base, int) else None


def collect_ranked(sweep_dir: Path) -> tuple[tuple[dict[str, Any], list[TrialResult]], Ranking]:
    """:func:`collect` plus the :class:`~orchestrator.sweep.ranking.Ranking` (verdict lines, mixed families)."""
    meta, trials, _, ranking = collect_configs(sweep_dir)
    return (meta, trials), ranking


def collect_configs(sweep_dir: Path) -> tuple[dict[str, Any], list[TrialResult], list[ConfigResult], Ranking]:
    """Every trial, every configuration (seeds grouped, ranked at equal budget) and the ranking."""
    from ray.tune import ExperimentAnalysis

    from orchestrator.sweep.ranking import MIN_EFFECT
    from orchestrator.sweep.spec import config_key

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
        with_draws = metric == "val/nll" and mode == "min"
        val_dir = tdir / "train" / "val"
        curve: dict[int, tuple[float, float | None]] = {}
        for r in scored:
            if "step" in r:
                se_r = r.get(f"{metric}_se")
                curve[int(r["step"])] = (sign * float(r[metric]), float(se_r) if isinstance(se_r, (int, float)) else None)
        cands[t.trial_id] = Candidate(
            t.trial_id, t.family, None if t.best_metric is None else sign * t.best_metric, t.best_se,
            step=best_step, config=config_key(params), seed=_trial_seed(params, meta), curve=curve,
            draws_at=(lambda s, d=val_dir: draws_at(d, s)) if with_draws else None,
        )
    ranking = rank_candidates(list(cands.values()), float(cfg.get("min_effect", MIN_EFFECT)))
    by_id = {t.trial_id: t for t in out}
    configs: list[ConfigResult] = []
    order: dict[str, int] = {}
    for p in ranking.rows:
        g = p.cand
        members = [by_id[k] for k in g.trials]
        first = members[0]
        for t in members:
            order[t.trial_id] = len(order)
            t.rank, t.overall_rank, t.is_best = p.rank, p.overall, p.is_best
            t.diff_to_best = None if p.diff is None else sign * p.diff
            t.diff_se, t.paired, t.tied = p.diff_se, p.paired, p.tied
        statuses = sorted({t.status for t in members})
        per_seed = [None if g.step is None and g.nll is None else (c.points().get(g.step, (None,))[0]) for c in g.members]
        configs.append(ConfigResult(
            config=g.key,
            params={k: v for k, v in first.params.items() if k in cfg["search"]},
            family=g.family,
            trials=g.trials,
            seeds=[c.seed for c in g.members],
            n_seeds=g.n_seeds,
            step=g.step,
            val_nll_mean=None if g.nll is None else sign * g.nll,
            val_nll_se=g.se,
            seed_sd=g.sd if g.sd is not None and math.isfinite(g.sd) else None,
            per_seed=[None if v is None else sign * v for v in per_seed],
            rank=p.rank,
            overall_rank=p.overall,
            is_best=p.is_best,
            diff_to_best=None if p.diff is None else sign * p.diff,
            diff_se=p.diff_se,
            diff_at_step=p.at_step,
            paired=p.paired,
            seeds_paired=p.seeds_paired,
            tied=p.tied,
            why_tied=p.why_tied,
            full_budget=g.full if p.rank is not None else False,
            stopped_early=any(t.stopped_early for t in members),
            steps=max(t.steps for t in members),
            status="/".join(statuses),
            wall_time_s=sum(t.wall_time_s for t in members),
            error=next((t.error for t in members if t.error), None),
            best_checkpoint=first.best_checkpoint,
            trial_dir=first.trial_dir,
        ))
    out.sort(key=lambda t: order.get(t.trial_id, len(order)))
    return meta, out, configs, ranking


def sample_quality_file(trial_dir: str | Path, best_checkpoint: str | None = None) -> Path | None:
    """The ``sample_quality.json`` an eval of the trial's run wrote: ``TRIAL/train/eval/`` (what
    `difflm eval TRIAL/train --gen-ppl` writes), else the best checkpoint's ``eval/`` folder; None if neither."""
    from orchestrator.eval.genppl import eval_dir

    candidates = [Path(trial_dir) / "train" / "eval" / "sample_quality.json"]
    if best_checkpoint:
        candidates.append(eval_dir(Path(best_checkpoint)) / "sample_quality.json")
    return next((c for c in candidates if c.is_file()), None)


def _read_sample_quality(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a file cut by a kill: as if the trial was not evaluated
    return data if isinstance(data, dict) and data.get("gen_ppl") else None


def attach_sample_quality(configs: list[ConfigResult], trials: dict[str, TrialResult]) -> list[str]:
    """Fill each configuration's gen-PPL / entropy fields from its trials' eval results; return note lines.

    Which point: a run evaluated at several ``--steps`` has one row per T; the table shows the largest T
    that every evaluated trial has (so rows compare at equal T), else per configuration the largest T
    its seeds share (a note says the rows differ). Seeds: the mean over the configuration's evaluated trials, SE =
    sqrt(sum SE_i^2) / n (independent samples per trial). gen-PPL is only comparable under one judge
    and one sampling precision, so a note names it when trials differ."""
    found: dict[str, dict[str, Any]] = {}
    for c in configs:
        for tid in c.trials:
            t = trials.get(tid)
            path = sample_quality_file(t.trial_dir, t.best_checkpoint) if t is not None else None
            data = _read_sample_quality(path) if path else None
            if data is not None:
                found[tid] = data
    if not found:
        return []
    common = set.intersection(*({int(r["steps"]) for r in d["gen_ppl"]} for d in found.values()))
    notes: list[str] = []
    for c in configs:
        mine = [(found[tid], {int(r["steps"]): r for r in found[tid]["gen_ppl"]}) for tid in c.trials if tid in found]
        if not mine:
            continue
        own = set.intersection(*(set(by_t) for _, by_t in mine))  # its seeds at one T even when configs differ
        pick = max(common) if common else max(own) if own else None
        rows = [(data, by_t[pick] if pick is not None else by_t[max(by_t)]) for data, by_t in mine]
        n = len(rows)

        def mean_se(key: str) -> tuple[float, float]:
            return (sum(float(r[key]) for _, r in rows) / n,
                    math.sqrt(sum(float(r.get(f"{key}_se") or 0.0) ** 2 for _, r in rows)) / n)

        c.gen_ppl, c.gen_ppl_se = mean_se("gen_ppl")
        c.entropy, c.entropy_se = mean_se("entropy")
        c.gen_steps = int(rows[0][1]["steps"])
        c.gen_judge = str(rows[0][0].get("judge"))
        c.gen_sample_dtype = str(rows[0][0].get("sample_dtype"))
        c.gen_trials = n
    judges = {str(d.get("judge")) for d in found.values()}
    dtypes = {str(d.get("sample_dtype")) for d in found.values()}
    steps = {c.gen_steps for c in configs if c.gen_steps is not None}
    if len(judges) > 1:
        notes.append(f"gen-PPL: trials were judged by {len(judges)} different judges; their gen-PPL do not compare")
    if len(dtypes) > 1:
        notes.append(f"gen-PPL: trials were sampled in {' and '.join(sorted(dtypes))}; float32 draws lower entropy and gen-PPL")
    if len(steps) > 1:
        notes.append(f"gen-PPL: no sampler step count is common to every evaluated trial; rows use T = "
                     f"{', '.join(map(str, sorted(steps)))}")
    elif judges and dtypes:
        notes.append(f"gen-PPL / entropy: T={steps.pop()} steps, {dtypes.pop()} draws, judge {judges.pop()} "
                     "(`difflm eval TRIAL/train --gen-ppl`); ± SE over samples, mean over seeds")
    return notes


def expected_trials(meta: dict[str, Any]) -> int:
    """Trials a complete sweep has: num_samples x the product of grid sizes."""
    n = int(meta["sweep"]["num_samples"]) * int(meta["sweep"].get("seeds") or 1)
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


def markdown_table(meta: dict[str, Any], configs: list[ConfigResult], mixed: bool = False) -> str:
    """Ranked table, one row per configuration: mean val NLL ± SE over its seeds at the step compared,
    between-seed SD, n seeds, the difference to the family's best ± SE at that step, ties."""
    params = list(meta["sweep"]["search"])
    metric = meta["sweep"]["metric"]
    head = ["rank", "trial(s)", *[p.split(".")[-1] for p in params], f"{metric} mean ± SE", "seed SD", "seeds",
            "at step", "Δ to best ± SE", "tied", "steps", "early stop", "wall s", "status", "best checkpoint"]
    quality = any(c.gen_ppl is not None for c in configs)
    at = head.index("tied") + 1  # sample quality goes after the val NLL columns, before the bookkeeping ones
    if quality:
        head[at:at] = ["gen-PPL ± SE", "entropy ± SE"]
    if mixed:
        head[1:1] = ["family", "overall (bounds differ)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in configs:
        status = c.status + (f": {c.error}" if c.error else "")
        rank = "-" if c.rank is None else f"{c.rank}{' (best)' if c.is_best else ''}"
        if c.rank is not None and not c.full_budget:
            rank += " (stopped early)"
        row = [rank, ", ".join(c.trials), *[_cell(c.params.get(p)) for p in params], fmt_pm(c.val_nll_mean, c.val_nll_se),
               fmt_sd(c.seed_sd, c.n_seeds), str(c.n_seeds), "-" if c.step is None else str(c.step), _diff_cell(c),
               "tied" if c.tied else "", str(c.steps), "yes" if c.stopped_early else "no", f"{c.wall_time_s:.0f}",
               status.replace("|", "/"), c.best_checkpoint or "-"]
        if quality:
            row[at:at] = [_pm(c.gen_ppl, c.gen_ppl_se, 2), _pm(c.entropy, c.entropy_se, 3)]
        if mixed:
            row[1:1] = [c.family, "-" if c.overall_rank is None else str(c.overall_rank)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _pm(value: float | None, se: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def _diff_cell(c: ConfigResult) -> str:
    from orchestrator.sweep.ranking import Group, Placed

    placed = Placed(Group(c.config, c.family, []), rank=c.rank, diff=c.diff_to_best, diff_se=c.diff_se,
                    paired=c.paired, at_step=c.diff_at_step)
    return fmt_diff(placed)


def write_tables(sweep_dir: Path, meta: dict[str, Any], configs: list[ConfigResult]) -> None:
    """results.json / results.csv: one row per configuration, in rank order (seeds grouped)."""
    params = list(meta["sweep"]["search"])
    records = []
    for c in configs:
        rec = {k: v for k, v in asdict(c).items() if k != "params"}
        rec = {"rank": c.rank, **{p: c.params.get(p) for p in params}, **rec}
        records.append(rec)
    atomic_write_text(sweep_dir / "results.json", json.dumps(records, indent=2, default=str))
    flat = [{k: (";".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()} for r in records]
    with atomic_path(sweep_dir / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["rank"])
        writer.writeheader()
        writer.writerows(flat)


def write_hparams(meta: dict[str, Any], trials: list[TrialResult], configs: list[ConfigResult] | None = None) -> None:
    """One HParams session per trial under <trial>/tensorboard/hparams (rewritten each time).

    Each session carries its configuration's grouped numbers too (mean ± SE over seeds, between-seed SD,
    n seeds, the step compared, the difference to the best), so HParams sorts by what the table ranks."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    of_trial = {tid: c for c in (configs or []) for tid in c.trials}
    for t in trials:
        hp_dir = Path(t.trial_dir) / "tensorboard" / "hparams"
        if hp_dir.exists():
            shutil.rmtree(hp_dir)
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in t.params.items()}
        c = of_trial.get(t.trial_id)
        metrics = {
            "hparams/best_val_nll": t.best_metric,
            "hparams/best_val_nll_se": t.best_se,
            "hparams/final_val_nll": t.final_metric,
            "hparams/best_val_ppl": t.best_ppl,
            "hparams/final_val_ppl": t.final_ppl,
            "hparams/config_val_nll_mean": c.val_nll_mean if c else None,
            "hparams/config_val_nll_se": c.val_nll_se if c else None,
            "hparams/config_seed_sd": c.seed_sd if c else None,
            "hparams/config_n_seeds": c.n_seeds if c else None,
            "hparams/config_step": c.step if c else None,
            "hparams/config_diff_to_best": c.diff_to_best if c else None,
            "hparams/config_diff_se": c.diff_se if c else None,
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


def config_curves(c: ConfigResult, trials: list[TrialResult]) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, between-seed SD) of a configuration's val curve, at the steps all its seeds evaluated."""
    from statistics import fmean, stdev

    by_id = {t.trial_id: t for t in trials}
    hists = [dict(by_id[k].history) for k in c.trials if k in by_id]
    if not hists:
        return [], [], []
    steps = sorted(set.intersection(*(set(h) for h in hists)))
    means = [fmean(h[s] for h in hists) for s in steps]
    sds = [stdev(h[s] for h in hists) if len(hists) > 1 else 0.0 for s in steps]
    return steps, means, sds


def write_plots(sweep_dir: Path, meta: dict[str, Any], trials: list[TrialResult],
                configs: list[ConfigResult] | None = None) -> list[Path]:
    """val_nll_vs_step.png: each configuration's mean over seeds, a ± between-seed SD band, an x where ASHA
    stopped it and a ring at the step its difference to the best was taken; params_vs_objective.png: the
    compared value ± SE per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = configs or []
    metric = meta["sweep"]["metric"]
    params = list(meta["sweep"]["search"])
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for c in configs:
        xs, ys, sds = config_curves(c, trials)
        if not xs:
            continue
        label = ", ".join(f"{p.split('.')[-1]}={_cell(c.params.get(p))}" for p in params)
        label += f" ({c.n_seeds} seeds)" if c.n_seeds > 1 else ""
        line = ax.plot(xs, ys, marker="o", markersize=3, label=label + (" (best)" if c.is_best else ""))[0]
        if c.n_seeds > 1:
            ax.fill_between(xs, [y - s for y, s in zip(ys, sds)], [y + s for y, s in zip(ys, sds)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        if c.stopped_early:
            ax.plot([xs[-1]], [ys[-1]], marker="x", markersize=9, color=line.get_color())
        if c.diff_at_step is not None and c.diff_at_step in xs and not c.is_best:
            ax.plot([c.diff_at_step], [ys[xs.index(c.diff_at_step)]], marker="o", markersize=9, fillstyle="none",
                    color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title("val NLL per configuration: mean over seeds ± between-seed SD; x: stopped by ASHA; "
                 "ring: step of its Δ to best", fontsize=8)
    if any(config_curves(c, trials)[0] for c in configs):
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(sweep_dir / "val_nll_vs_step.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 4), squeeze=False)
    for ax, p in zip(axes[0], params):
        scored = [c for c in configs if c.val_nll_mean is not None]
        pts = [(c.params.get(p), c.val_nll_mean) for c in scored]
        errs = [c.val_nll_se if c.val_nll_se is not None and math.isfinite(c.val_nll_se) else 0.0 for c in scored]
        if pts and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts):
            ax.errorbar([x for x, _ in pts], [y for _, y in pts], yerr=errs, fmt="o", capsize=3)
            if "log" in str(meta["sweep"]["search"][p]):
                ax.set_xscale("log")
        elif pts:
            cats = sorted({str(x) for x, _ in pts})
            ax.errorbar([cats.index(str(x)) for x, _ in pts], [y for _, y in pts], yerr=errs, fmt="o", capsize=3)
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
        ax.set_xlabel(p)
        ax.set_ylabel(f"{metric} at the step compared ± SE")
    fig.tight_layout()
    paths.append(sweep_dir / "params_vs_objective.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return paths


def report(sweep_dir: Path, *, write_hparams_data: bool = True) -> tuple[str, list[TrialResult]]:
    """Collect, write CSV/JSON/plots (+ HParams), return the markdown table with its verdict lines."""
    meta, trials, configs, ranking = collect_configs(sweep_dir)
    quality_notes = attach_sample_quality(configs, {t.trial_id: t for t in trials})
    write_tables(sweep_dir, meta, configs)
    write_plots(sweep_dir, meta, trials, configs)
    if write_hparams_data:
        write_hparams(meta, trials, configs)
    text = markdown_table(meta, configs, mixed=ranking.mixed)
    notes = ([MIXED_NOTE] if ranking.mixed else []) + ranking.verdicts + quality_notes
    return text + ("\n\n" + "\n".join(notes) if notes else ""), trials
