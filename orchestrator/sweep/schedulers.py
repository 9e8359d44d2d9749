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

from orchestrator.raycompat import asha_bracket, asha_limits, asha_metric, asha_rungs
from orchestrator.sweep.results import read_results


class ResumableASHA(AsyncHyperBandScheduler):
    """``AsyncHyperBandScheduler`` whose rungs are rebuilt from the trials' reported results on restore."""

    def __init__(self, *args: Any, seeds: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: trial id -> reports replayed into the rungs (what a restore recovered; 0 for new trials)
        self.replayed: dict[str, int] = {}
        #: replicates per configuration (sweep.seeds); above 1 a configuration's seeds are judged together
        self.seeds = seeds
        self.groups = GroupRungs(seeds)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if self.seeds <= 1:
            return super().on_trial_result(tune_controller, trial, result)
        time_attr, metric, sign = asha_metric(self)
        t, value = result.get(time_attr), result.get(metric)
        if not isinstance(t, (int, float)) or not isinstance(value, (int, float)):
            return self.CONTINUE
        action = self.groups.on_result(trial.trial_id, dict(trial.config), t, sign * value,
                                       self._milestones(), asha_bracket(self, trial.trial_id).cutoff)
        max_t, stop_last_trials = asha_limits(self)
        if t >= max_t and stop_last_trials:
            return self.STOP
        return action

    def _milestones(self) -> list[float]:
        return [milestone for milestone, _ in asha_rungs(self)]  # highest first

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
                if self.seeds > 1:  # the configuration's rung means (and a group stop) come back the same way
                    self.groups.on_result(trial.trial_id, dict(trial.config), t, sign * value,
                                          self._milestones(), bracket.cutoff)
                else:
                    bracket.on_result(trial, t, sign * value)
                n += 1
        return n

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone, {trial id: recorded value in the metric's own sign}) per rung, lowest milestone first."""
        sign = asha_metric(self)[2] or 1.0
        if self.seeds > 1:  # one value per configuration: the mean of its seeds
            return [(m, {k: sign * v for k, v in self.groups.means.get(m, {}).items()})
                    for m in reversed(self._milestones())]
        return [
            (milestone, {tid: sign * v for tid, v in recorded.items()})
            for milestone, recorded in reversed(asha_rungs(self))
        ]


class GroupRungs:
    """ASHA's rungs over configurations instead of trials (sweep.seeds > 1).

    A configuration is recorded at a rung once *all* its seeds have reported there (each seed's
    first report at or past the milestone, as ASHA records a trial), with the mean of those
    values; it is then stopped or promoted on that mean against the other configurations'
    means (ASHA's cutoff). Seeds that reach the rung first continue meanwhile; when the group is
    stopped, every seed still running stops at its next report at or past that rung (and one that
    starts later runs up to it), so no configuration is judged on one lucky seed. A seed that went
    on meanwhile (its siblings started later) stops at its next report, or has already finished;
    the results compare the configuration at the last step all its seeds reached. Depends only on each trial's own reports: replaying them rebuilds it.
    """

    def __init__(self, seeds: int) -> None:
        self.seeds = seeds
        #: milestone -> configuration -> trial id -> value recorded there (in ASHA's max-sign)
        self.values: dict[float, dict[str, dict[str, float]]] = {}
        #: milestone -> configuration -> mean of its seeds (complete configurations only)
        self.means: dict[float, dict[str, float]] = {}
        #: configuration -> the milestone it was stopped at
        self.stopped: dict[str, float] = {}

    def on_result(self, trial_id: str, config: dict[str, Any], t: float, value: float, milestones: list[float],
                  cutoff: Any) -> str:
        from ray.tune.schedulers import TrialScheduler

        from orchestrator.sweep.spec import config_key

        key = config_key(config)
        stop_at = self.stopped.get(key)
        if stop_at is not None and t >= stop_at:
            return TrialScheduler.STOP
        for milestone in milestones:  # highest first: like ASHA, only the highest rung passed records
            if t < milestone:
                continue
            rec = self.values.setdefault(milestone, {}).setdefault(key, {})
            if trial_id in rec:
                break
            rec[trial_id] = value
            if len(rec) >= self.seeds:
                mean = sum(rec.values()) / len(rec)
                means = self.means.setdefault(milestone, {})
                others = {k: v for k, v in means.items() if k != key}
                limit = cutoff(others)
                means[key] = mean
                if limit is not None and mean < limit:
                    self.stopped[key] = milestone
                    return TrialScheduler.STOP
            break
        return TrialScheduler.CONTINUE


def _trial_dir(trial: Any) -> Path | None:
    """The trial's folder, or None for a trial new to the sweep (Tune names its folder when it starts)."""
    try:
        return Path(trial.path) if trial.path else None
    except RuntimeError:  # "Should not access `trial_fs_path` without setting `trial_dir_name`"
        return None
