"""ASHA keeps its early-stopping state across a restore (orchestrator/sweep/schedulers.py), in-process: no Ray
cluster.

The restore is simulated the way Tune does it: the scheduler comes back from a pickle taken when
the sweep started (tuner.pkl), then every trial of the experiment is re-added.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from orchestrator.sweep.schedulers import ResumableASHA

# val/nll at steps 5, 10, 15, 20 (max_t) of four trials that run one after another; lower is better.
CURVES = {
    "t1": [4.0, 3.5, 3.2, 3.0],
    "t2": [3.8, 3.6, 3.3, 3.1],
    "t3": [4.4, 4.3, 4.2, 4.1],  # worse than the median at step 5: an uninterrupted sweep stops it there
    "t4": [3.9, 3.4, 3.0, 2.9],
}
STEPS = [5, 10, 15, 20]


@dataclass
class FakeTrial:
    trial_id: str
    path: str

    def __hash__(self) -> int:
        return hash(self.trial_id)


def _sched(cls: type[AsyncHyperBandScheduler]) -> AsyncHyperBandScheduler:
    return cls(time_attr="step", metric="val/nll", mode="min", max_t=20, grace_period=5, reduction_factor=2)


def _run(sched: AsyncHyperBandScheduler, trial: FakeTrial, steps: list[int], log: Path | None) -> int | None:
    """Feed a trial's reports until the scheduler stops it (appending them to result.json as Tune's JSON
    logger does); return the step it stopped at (max_t included), None if it is still running."""
    for step in steps:
        row = {"step": step, "val/nll": CURVES[trial.trial_id][STEPS.index(step)], "worker_nodes": ["n1"]}
        if log is not None:
            with open(log / trial.trial_id / "result.json", "a") as f:
                f.write(json.dumps(row) + "\n")
        if sched.on_trial_result(None, trial, row) == TrialScheduler.STOP:
            sched.on_trial_complete(None, trial, row)
            return step
    return None


def _trials(tmp_path: Path) -> list[FakeTrial]:
    out = []
    for tid in CURVES:
        (tmp_path / tid).mkdir()
        out.append(FakeTrial(tid, str(tmp_path / tid)))
    return out


def _resumed(cls: type[AsyncHyperBandScheduler], tmp_path: Path, done_before: int, reports_of_next: int) -> dict[str, int]:
    """Run ``done_before`` trials to their end and ``reports_of_next`` reports of the next one, 'interrupt',
    restore from the start-time pickle, re-add the trials so far, and finish the sweep."""
    trials = _trials(tmp_path)
    sched = _sched(cls)
    at_start = pickle.dumps(sched)  # what Tune puts in tuner.pkl
    stopped: dict[str, int] = {}
    for t in trials[:done_before]:
        sched.on_trial_add(None, t)
        stopped[t.trial_id] = _run(sched, t, STEPS, tmp_path)
    nxt = trials[done_before]
    sched.on_trial_add(None, nxt)  # started; it may or may not have reported before the interruption
    ended = _run(sched, nxt, STEPS[:reports_of_next], tmp_path)
    restored = pickle.loads(at_start)
    for t in trials[: done_before + 1]:  # Tune re-adds every restored trial, finished ones included
        restored.on_trial_add(None, t)
    # a trial stopped before the interruption stays stopped; a running one continues from its last checkpoint
    stopped[nxt.trial_id] = ended or _run(restored, nxt, STEPS[reports_of_next:], tmp_path)
    for t in trials[done_before + 1 :]:
        restored.on_trial_add(None, t)
        stopped[t.trial_id] = _run(restored, t, STEPS, tmp_path)
    return stopped


def _uninterrupted(cls: type[AsyncHyperBandScheduler], tmp_path: Path) -> dict[str, int]:
    sched = _sched(cls)
    stopped = {}
    for t in _trials(tmp_path):
        sched.on_trial_add(None, t)
        stopped[t.trial_id] = _run(sched, t, STEPS, None)
    return stopped


def test_uninterrupted_reference(tmp_path: Path) -> None:
    # t1 alone at every rung: runs to the end; t2 is worse than t1 at 10; t3 worse than the median at 5
    # (its step-5 value is still recorded before the decision); t4 is better than the cut-offs.
    assert _uninterrupted(ResumableASHA, tmp_path) == {"t1": 20, "t2": 10, "t3": 5, "t4": 20}


def test_restored_rungs_equal_uninterrupted(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    live = _sched(ResumableASHA)
    for t in _trials(a):
        live.on_trial_add(None, t)
        _run(live, t, STEPS[:2], a)
    resumed = pickle.loads(pickle.dumps(_sched(ResumableASHA)))
    for t in _trials(b):
        (Path(t.path) / "result.json").write_text((a / t.trial_id / "result.json").read_text())
        resumed.on_trial_add(None, t)
    assert resumed.rungs() == live.rungs()
    # t3 was stopped at its first report, so it reported once
    assert resumed.replayed == {"t1": 2, "t2": 2, "t3": 1, "t4": 2}
    assert dict(resumed.rungs())[5] == {tid: c[0] for tid, c in CURVES.items()}


# (trials finished before the interruption, reports the next trial had made)
INTERRUPTIONS = [(2, 0), (3, 1), (1, 2)]


@pytest.mark.parametrize("done_before,reports_of_next", INTERRUPTIONS)
def test_resumed_sweep_stops_the_same_trials(tmp_path: Path, done_before: int, reports_of_next: int) -> None:
    (tmp_path / "u").mkdir()
    (tmp_path / "r").mkdir()
    expected = _uninterrupted(ResumableASHA, tmp_path / "u")
    assert _resumed(ResumableASHA, tmp_path / "r", done_before, reports_of_next) == expected


def test_plain_asha_forgets_its_rungs_on_restore(tmp_path: Path) -> None:
    """The bug the subclass fixes (the quickstart after Ctrl-C with 2 of 4 trials done): Tune's own ASHA,
    restored the same way, lets t3 run to the end although the first two trials put it below the median."""
    resumed = _resumed(AsyncHyperBandScheduler, tmp_path, 2, 0)
    assert resumed == {"t1": 20, "t2": 10, "t3": 20, "t4": 20}


def test_new_trial_replays_nothing(tmp_path: Path) -> None:
    sched = _sched(ResumableASHA)
    t = FakeTrial("new", str(tmp_path / "missing"))
    sched.on_trial_add(None, t)
    assert sched.replayed == {"new": 0}
    assert all(not recorded for _, recorded in sched.rungs())


@pytest.mark.parametrize("bad", ["{not json", '{"step": 5}', '{"val/nll": 3.0}'])
def test_cut_and_partial_rows_are_skipped(tmp_path: Path, bad: str) -> None:
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "result.json").write_text(bad + "\n" + json.dumps({"step": 5, "val/nll": 4.0}) + "\n")
    sched = _sched(ResumableASHA)
    sched.on_trial_add(None, FakeTrial("t1", str(tmp_path / "t1")))
    assert sched.replayed == {"t1": 1} and dict(sched.rungs())[5] == {"t1": 4.0}


class UnnamedTrial:
    """A trial Tune has just created: its folder has no name yet and ``path`` raises (Ray 2.60)."""

    trial_id = "fresh"

    @property
    def path(self) -> str:
        raise RuntimeError("Should not access `trial_fs_path` without setting `trial_dir_name`")


def test_trial_without_a_folder_yet_replays_nothing() -> None:
    sched = _sched(ResumableASHA)
    sched.on_trial_add(None, UnnamedTrial())
    assert sched.replayed == {"fresh": 0}
