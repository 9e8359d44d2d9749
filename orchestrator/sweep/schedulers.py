"""Tune schedulers for difflm sweeps: ASHA that survives ``--resume``, and trials started only when
their workers fit the cluster as it is now.

**ASHA across ``Tuner.restore``.** Tune saves the trials, the searcher and the callbacks with
the experiment, but not the scheduler (``TuneController.save_to_dir``; ray-project/ray#30838,
open). On restore the scheduler is unpickled from ``tuner.pkl``, written when the sweep
*started*, so every rung is empty: the first trial to reach a rung after a resume always
continues, and a resumed sweep stops fewer trials than the same sweep run in one go (seen on
the quickstart: after Ctrl-C with 2 of 4 trials done, the other two ran all 60 steps).

The fix needs no new state file: a rung records, per trial, the metric of the trial's first
report at or past the rung's milestone, which depends only on that trial's own reports, not
on their order across trials. Every trial's reports are on disk (``result.json``, written by
Tune's JSON logger), and Tune re-adds every trial it restores (finished ones included)
through ``on_trial_add``. So :class:`ResumableASHA` replays each added trial's reports into
its bracket; the rungs come back exactly as an uninterrupted sweep has them, and the
remaining trials are judged against the same cut-offs. A trial new to the sweep has no
``result.json`` and replays nothing. Reports that Tune had not flushed when its driver was
SIGKILLed are missing from the replay; after Ctrl-C (Tune stops cleanly) none are.

**Admission by what the cluster holds now.** A trial is a Tune actor holding 0.01 CPU whose
Train run then asks for its workers (carved so that N one-CPU trials fit on N CPUs, see
``sweep/spec.py: base_raw``). Tune only knows the 0.01, so it would start every pending trial
whose actor fits. That is fine while ``max_concurrent_trials`` matches the cluster, but not
after a node is lost: Tune restarts the lost trials at once, their actors fill the last
fraction of the surviving node's CPUs, and no trial's workers fit any more: a deadlock
(measured on a 2-node loopback cluster). :class:`CapacityMixin` starts a pending trial only
when its workers' CPUs and GPUs, added to those of the running trials, fit the cluster's
current totals; the rest wait for a running trial to end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from orchestrator.sweep.results import read_results
from orchestrator.sweep.spec import trial_raw


@dataclass
class TrialNeeds:
    """What a trial's Train run asks for, from the base spec, the sampled params and the linked values."""

    base: dict[str, Any]
    linked: dict[str, dict[str, dict[str, Any]]]
    trial_cpus: float
    use_gpu: bool

    def of(self, config: dict[str, Any]) -> tuple[float, float]:
        """(CPUs, GPUs) of one trial: its actor plus its workers."""
        try:
            s = trial_raw(self.base, dict(config), self.linked)["scaling"]
        except Exception:  # a sampled spec the trial will reject at once: it needs only its actor
            return self.trial_cpus, 0.0
        workers = int(s["num_workers"])
        gpus = workers * float(s["gpus_per_worker"]) if self.use_gpu else 0.0
        return self.trial_cpus + workers * float(s["cpus_per_worker"]), gpus


class CapacityMixin:
    """Start a pending trial only if its workers fit the cluster's current CPU/GPU totals with the running ones."""

    needs: TrialNeeds | None = None
    _totals: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (time read, CPUs, GPUs)

    def set_needs(self, needs: TrialNeeds) -> None:
        self.needs = needs

    def _cluster(self) -> tuple[float, float]:
        """Alive CPUs and GPUs, read at most once a second (this runs every Tune loop)."""
        import ray

        now = time.monotonic()
        if now - self._totals[0] > 1.0:
            res = ray.cluster_resources()
            self._totals = (now, float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0)))
        return self._totals[1], self._totals[2]

    def fits(self, candidate: Any, running: list[Any]) -> bool:
        if self.needs is None:
            return True
        cpus, gpus = self._cluster()
        used = [self.needs.of(t.config) for t in running]
        want = self.needs.of(candidate.config)
        eps = 1e-6
        return (sum(u[0] for u in used) + want[0] <= cpus + eps) and (sum(u[1] for u in used) + want[1] <= gpus + eps)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        trial = super().choose_trial_to_run(tune_controller)  # type: ignore[misc]
        if trial is None:
            return None
        running = [t for t in tune_controller.get_trials() if t.status == Trial.RUNNING and t is not trial]
        return trial if not running or self.fits(trial, running) else None


class CapacityFIFO(CapacityMixin, FIFOScheduler):
    """First in, first out (``scheduler: {kind: none}``), started only as the cluster holds them."""


class ResumableASHA(CapacityMixin, AsyncHyperBandScheduler):
    """``AsyncHyperBandScheduler`` whose rungs are rebuilt from the trials' reported results on restore
    (and whose trials start only as the cluster holds them)."""

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
        bracket = self._trial_info[trial.trial_id]
        n = 0
        for row in rows:
            t, value = row.get(self._time_attr), row.get(self._metric)
            if isinstance(t, (int, float)) and isinstance(value, (int, float)):
                bracket.on_result(trial, t, self._metric_op * value)
                n += 1
        return n

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone, {trial id: recorded value in the metric's own sign}) per rung, lowest milestone first."""
        sign = self._metric_op or 1.0
        return [
            (milestone, {tid: sign * v for tid, v in recorded.items()})
            for milestone, recorded in reversed(self._brackets[0]._rungs)
        ]


def _trial_dir(trial: Any) -> Path | None:
    """The trial's folder, or None for a trial new to the sweep (Tune names its folder when it starts)."""
    try:
        return Path(trial.path) if trial.path else None
    except RuntimeError:  # "Should not access `trial_fs_path` without setting `trial_dir_name`"
        return None
