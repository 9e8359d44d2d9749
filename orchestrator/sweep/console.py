"""Live sweep table: a compact, in-place refreshed table on a terminal; periodic plain lines otherwise.

Implemented as a Tune ``Callback`` that renders from the trial list Tune passes
each loop and from what the trials wrote to disk, so it needs no state of its own
and works unchanged after a resume (Tune pickles callbacks with the experiment; the
console is looked up at run time through :data:`ACTIVE`, never pickled).

For the val NLL it shows, on each trial's row, its configuration's numbers (seeds
grouped): rank, mean ± SE at the last step all its seeds reached, between-seed SD, seeds,
and the difference to the best of its family ± SE taken at that same step, read from the
per-sequence val draws each trial saves at its eval points
(``<trial>/train/val/step_*.npz``), with ties marked and the verdict as the table's
caption: the same ranking as ``difflm results`` (:mod:`orchestrator.sweep.ranking`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from difflm.evaluation import ValDraws, load_val_draws
from orchestrator.sweep.ranking import (
    MIXED_NOTE,
    Candidate,
    Placed,
    Ranking,
    fmt_diff,
    fmt_pm,
    fmt_sd,
    rank_candidates,
)
from orchestrator.sweep.spec import SweepFile, trial_dirname, trial_raw

#: the driver's console (orchestrator.train.console.TrainConsole); set by `difflm sweep`
ACTIVE: dict[str, Any] = {}


def _val(x: Any) -> str:
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.4g}"
    return "-" if x is None else str(x)


def trial_row(trial: Any, params: list[str], metric: str, placed: Placed | None = None) -> list[str]:
    res = trial.last_result or {}
    status = trial.status
    if status == "ERROR":
        status = "FAILED"
    row = [
        trial.trial_id,
        *[_val(trial.config.get(p)) for p in params],
        status,
        _val(res.get("step")),
        _val(res.get(metric)),
    ]
    if placed is not None:
        g = placed.cand
        rank = "-" if placed.rank is None else str(placed.rank) + ("" if g.full else " (early)")
        row += [rank, fmt_pm(g.nll, g.se), fmt_sd(g.sd, g.n_seeds), str(g.n_seeds),
                "-" if g.step is None else str(g.step), fmt_diff(placed), "tied" if placed.tied else ""]
    return row


class DrawsCache:
    """Each trial's best saved val draws, re-read only when a file changes (the table redraws every second)."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, ValDraws | None]] = {}

    def best(self, val_dir: Path) -> ValDraws | None:
        """The draws with the lowest val NLL among ``val_dir/step_*.npz`` (None: no eval saved yet)."""
        evals = self.by_step(val_dir)
        return min(evals.values(), key=lambda d: d.nll) if evals else None

    def by_step(self, val_dir: Path) -> dict[int, ValDraws]:
        """step -> the draws saved at that eval (``val_dir/step_XXXXXXX.npz``), unreadable ones left out."""
        out: dict[int, ValDraws] = {}
        for path in sorted(val_dir.glob("step_*.npz")) if val_dir.is_dir() else []:
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            cached = self._files.get(str(path))
            if cached is None or cached[0] != mtime:
                try:
                    draws: ValDraws | None = load_val_draws(path)
                except (OSError, ValueError, KeyError):
                    draws = None
                self._files[str(path)] = cached = (mtime, draws)
            d = cached[1]
            if d is not None:
                try:
                    out[int(path.stem.split("_")[-1])] = d
                except ValueError:
                    continue
        return out


class SweepTable(Callback):
    """Tune callback that draws the trials table."""

    def __init__(self, sweep: SweepFile, sweep_dir: Path | None = None, plain_every_s: float = 30.0,
                 refresh_s: float = 1.0) -> None:
        self.params = list(sweep.sweep.search)
        self.metric = sweep.sweep.metric
        # Error bars come from the saved val draws: only for the val NLL, lower = better.
        self.with_errors = sweep.sweep.metric == "val/nll" and sweep.sweep.mode == "min" and sweep_dir is not None
        self.sweep_dir = None if sweep_dir is None else str(sweep_dir)
        self.base = sweep.base_raw()
        self.linked = sweep.sweep.linked
        self.min_effect = sweep.sweep.min_effect
        self._draws = DrawsCache()
        self.plain_every_s = plain_every_s
        self.refresh_s = refresh_s
        self._last = 0.0
        self._live: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_live"] = None
        state["_draws"] = DrawsCache()
        return state

    def _console(self) -> Any:
        return ACTIVE.get("console")

    def _family(self, trial: Any) -> str:
        try:
            raw = trial_raw(self.base, dict(trial.config), self.linked)
        except Exception:  # a value the spec rejects: the trial fails anyway
            raw = self.base
        return str(raw.get("model", {}).get("family", "mdlm"))

    def _trial_dir(self, trial: Any) -> Path:
        path = getattr(trial, "path", None)
        if path and Path(path).is_dir():
            return Path(path)
        return Path(self.sweep_dir or ".") / trial_dirname(trial.trial_id, trial.config)

    def ranking(self, trials: list[Any]) -> Ranking | None:
        """Best val NLL ± SE and paired differences of every trial, from its saved draws (None: not the val NLL)."""
        if not self.with_errors:
            return None
        from orchestrator.sweep.spec import config_key, trial_seed

        cands = []
        for t in trials:
            evals = self._draws.by_step(self._trial_dir(t) / "train" / "val")
            cands.append(Candidate(
                t.trial_id, self._family(t), None, None, config=config_key(dict(t.config)),
                seed=trial_seed(dict(t.config), int(self.base.get("train", {}).get("seed", 0))),
                curve={s: (d.nll, d.se) for s, d in evals.items()}, draws_at=evals.get,
            ))
        return rank_candidates(cands, self.min_effect)

    def _table(self, trials: list[Any]) -> Any:
        from rich.table import Table

        ranking = self.ranking(trials)
        table = Table(title="difflm sweep", title_justify="left", show_edge=False, pad_edge=False,
                      caption_justify="left")
        heads = ["trial", *(p.split(".")[-1] for p in self.params), "status", "step", self.metric]
        if ranking is not None:
            heads += ["rank", "config mean ± SE", "seed SD", "seeds", "at step", "Δ to best ± SE", "tied"]
        for head in heads:
            table.add_column(head)
        placed = {k: p for p in ranking.rows for k in p.cand.trials} if ranking is not None else {}
        for t in trials:
            table.add_row(*trial_row(t, self.params, self.metric, placed.get(t.trial_id)))
        if ranking is not None and any(p.rank for p in ranking.rows):
            table.caption = "\n".join(([MIXED_NOTE] if ranking.mixed else []) + ranking.verdicts)
        return table

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        console = self._console()
        if console is None:
            return
        now = time.monotonic()
        if console.tty:
            if now - self._last < self.refresh_s:
                return
            self._last = now
            from rich.live import Live

            if self._live is None:
                self._live = Live(self._table(trials), console=console.console, refresh_per_second=2, transient=False)
                self._live.start()
            else:
                self._live.update(self._table(trials))
            return
        if now - self._last >= self.plain_every_s:
            self._last = now
            counts: dict[str, int] = {}
            for t in trials:
                counts[t.status] = counts.get(t.status, 0) + 1
            best = [t.last_result.get(self.metric) for t in trials if t.last_result and self.metric in t.last_result]
            best_s = f", best {self.metric} {min(best):.4f}" if best else ""
            ranking = self.ranking(trials)
            top = ranking.rows[0] if ranking is not None and ranking.rows and ranking.rows[0].rank else None
            if top is not None:
                n_tied = sum(p.tied for p in ranking.rows if p.rank and p.rank > 1)  # type: ignore[union-attr]
                best_s = (f", best {self.metric} {fmt_pm(top.cand.nll, top.cand.se)} ({top.cand.key}"
                          + (f", {n_tied} tied with it" if n_tied else "") + ")")
            console.info(f"[sweep] {', '.join(f'{k.lower()} {v}' for k, v in sorted(counts.items()))}{best_s}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        console = self._console()
        if console is not None and not console.tty:
            console.info(f"[sweep] trial {trial.trial_id} failed (see the results table)")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._live is not None:  # last frame: every trial in its final state
            self._live.update(self._table(trials))
        # without a terminal, the results table printed next carries the verdict

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
