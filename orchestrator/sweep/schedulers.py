"""ASHA that keeps its early-stopping state across ``Tuner.restore``.

Why this exists: Tune saves the trials, the searcher and the callbacks with the experiment,
but not the scheduler (``TuneController.save_to_dir``; ray-project/ray#30838, open). On
restore the scheduler is unpickled from ``tuner.pkl``, written when the sweep *started*, so
every rung is empty: the first trial to reach a rung after a resume always continues, and a
resumed sweep stops fewer trials than the same sweep run in one go (seen on the quickstart:
after Ctrl-C with 2 of 4 trials done, the other two ran all 60 steps).

The fix needs no new state file: a rung records, per trial, the metric of the trial's first
report at or past the rung's milestone, which depends only on that trial's own reports, not
on their order across trials. Every trial's reports are on disk (``result.json``, written by
Tune's JSON logger), and Tune re-adds every trial it restores (finished ones included)
through ``on_trial_add``. So :class:`ResumableASHA` replays each added trial's reports into
its bracket; the rungs come back exactly as an uninterrupted sweep has them, and the
remaining trials are judged against the same cut-offs. A trial new to the sweep has no
``result.json`` and replays nothing. Reports that Tune had not flushed when its driver was
SIGKILLed are missing from the replay; after Ctrl-C (Tune stops cleanly) none are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

from orchestrator.raycompat import asha_bracket, asha_metric, asha_rungs
from orchestrator.sweep.results import read_results


class ResumableASHA(AsyncHyperBandScheduler):
    """``AsyncHyperBandScheduler`` whose rungs are rebuilt from the trials' reported results on restore."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: trial id -> reports replayed into the rungs (what a restore recovered; 0 for new trials)
        self.replayed: dict[str, int] = {}

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        folder = _trial_dir(trial)
        self.replayed[trial.trial_id] = self.replay(trial, read_results(folder / "result.json") if folder else [])

    def replay(self, trial: Any, rows: list[dict[str, Any]]) -> int:
        """Feed a trial's past reports to its bracket, in report order, recording rung values only.

        The decisions these reports got at the time are not repeated: a trial stopped then is
        TERMINATED and never runs again; one that continued is still running.
        """
        bracket = asha_bracket(self, trial.trial_id)
        time_attr, metric, sign = asha_metric(self)
        n = 0
        for row in rows:
            t, value = row.get(time_attr), row.get(metric)
            if isinstance(t, (int, float)) and isinstance(value, (int, float)):
                bracket.on_result(trial, t, sign * value)
                n += 1
        return n

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone, {trial id: recorded value in the metric's own sign}) per rung, lowest milestone first."""
        sign = asha_metric(self)[2] or 1.0
        return [
            (milestone, {tid: sign * v for tid, v in recorded.items()})
            for milestone, recorded in reversed(asha_rungs(self))
        ]


def _trial_dir(trial: Any) -> Path | None:
    """The trial's folder, or None for a trial new to the sweep (Tune names its folder when it starts)."""
    try:
        return Path(trial.path) if trial.path else None
    except RuntimeError:  # "Should not access `trial_fs_path` without setting `trial_dir_name`"
        return None
