"""Live sweep table: a compact, in-place refreshed table on a terminal; periodic plain lines otherwise.

Implemented as a Tune ``Callback`` that renders from the trial list Tune passes
each loop, so it needs no state of its own and works unchanged after a resume
(Tune pickles callbacks with the experiment; the console is looked up at run
time through :data:`ACTIVE`, never pickled).
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import Callback

from orchestrator.sweep.spec import SweepFile

#: the driver's console (orchestrator.train.console.TrainConsole); set by `difflm sweep`
ACTIVE: dict[str, Any] = {}


def _val(x: Any) -> str:
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.4g}"
    return "-" if x is None else str(x)


def trial_row(trial: Any, params: list[str], metric: str) -> list[str]:
    res = trial.last_result or {}
    status = trial.status
    if status == "ERROR":
        status = "FAILED"
    return [
        trial.trial_id,
        *[_val(trial.config.get(p)) for p in params],
        status,
        _val(res.get("step")),
        _val(res.get(metric)),
    ]


class SweepTable(Callback):
    """Tune callback that draws the trials table."""

    def __init__(self, sweep: SweepFile, plain_every_s: float = 30.0, refresh_s: float = 1.0) -> None:
        self.params = list(sweep.sweep.search)
        self.metric = sweep.sweep.metric
        self.plain_every_s = plain_every_s
        self.refresh_s = refresh_s
        self._last = 0.0
        self._live: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_live"] = None
        return state

    def _console(self) -> Any:
        return ACTIVE.get("console")

    def _table(self, trials: list[Any]) -> Any:
        from rich.table import Table

        table = Table(title="difflm sweep", title_justify="left", show_edge=False, pad_edge=False)
        for head in ["trial", *(p.split(".")[-1] for p in self.params), "status", "step", self.metric]:
            table.add_column(head)
        for t in trials:
            table.add_row(*trial_row(t, self.params, self.metric))
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
            console.info(f"[sweep] {', '.join(f'{k.lower()} {v}' for k, v in sorted(counts.items()))}{best_s}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        console = self._console()
        if console is not None and not console.tty:
            console.info(f"[sweep] trial {trial.trial_id} failed (see the results table)")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._live is not None:  # last frame: every trial in its final state
            self._live.update(self._table(trials))

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
