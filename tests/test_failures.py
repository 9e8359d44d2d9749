"""Failures in one line (no Ray started): worker errors as Ray Train reports them, the CLI's exit codes,
and a sweep trial that stopped on non-finite losses failing with that reason."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import TrainingStopped
from orchestrator.train.failures import DIED, TrainingFailed, explain_fit_error, failure_line, keep_logs, summarize


def _ray_errors() -> tuple[Exception, Exception]:
    from ray.exceptions import ActorDiedError
    from orchestrator.raycompat import load

    WorkerHealthCheckFailedError = load("ray.train.v2._internal.exceptions:WorkerHealthCheckFailedError")

    died = WorkerHealthCheckFailedError("Worker health check failed: the actor died\n" + "x" * 600, ActorDiedError())
    user = ValueError("Traceback (most recent call last):\n  File ...\nValueError: tokens out of range [0, 259)")
    return died, user


def test_worker_errors_become_one_line_with_the_log() -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    died, user = _ray_errors()
    assert summarize(died) == DIED
    assert summarize(user) == "ValueError: tokens out of range [0, 259)"
    workers = {0: {"pid": 11, "log": "/tmp/ray/w-11.err"}, 1: {"pid": 12, "log": "/tmp/ray/w-12.err"}}
    # a dead rank is the root cause; the other rank's error is a consequence
    line = failure_line({0: summarize(user), 1: DIED}, workers)
    assert line == f"worker rank 1 (pid 12) {DIED} (1 other rank failed with it); its log: /tmp/ray/w-12.err"
    err = explain_fit_error(WorkerGroupError("[Rank 0 Error Snippet]:\n" + "y" * 900, {0: user}), workers)
    assert isinstance(err, TrainingFailed)
    assert str(err) == "worker rank 0 (pid 11) ValueError: tokens out of range [0, 259); its log: /tmp/ray/w-11.err"
    assert "\n" not in str(err)
    assert explain_fit_error(RuntimeError("controller"), workers) is None


@pytest.mark.parametrize(
    "exc,expected",
    [
        (TrainingStopped("non-finite loss at step 7 (5 steps in a row skipped)"),
         "error: training stopped: non-finite loss at step 7 (5 steps in a row skipped)\n"),
        (TrainingFailed("worker rank 1 (pid 12) died; its log: /tmp/w.err"),
         "error: training failed: worker rank 1 (pid 12) died; its log: /tmp/w.err\n"),
    ],
)
def test_cli_exits_1_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception, expected: str) -> None:
    import orchestrator.train.launch

    def fake_launch(*args: Any, **kwargs: Any) -> None:
        raise exc

    monkeypatch.setattr(orchestrator.train.launch, "launch_train", fake_launch)
    spec = tmp_path / "s.yaml"
    spec.write_text("scaling: {device: cpu}\n")
    res = CliRunner().invoke(main, ["train", str(spec), "--output", str(tmp_path)])
    assert res.exit_code == 1 and res.output == expected


def test_sweep_trial_fails_with_the_stop_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_trial raises the worker's stop reason, so Tune marks the trial FAILED with it (error.txt)."""
    import ray.tune

    import orchestrator.sweep.driver as sweep
    from orchestrator.rundir.run_folder import write_stop
    from orchestrator.spec.run import RunSpec

    class Trainer:
        def __init__(self, run_dir: Path) -> None:
            self.run_dir = run_dir

        def fit(self) -> Any:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_stop(self.run_dir, "non-finite loss at step 7 (5 steps in a row skipped)", 7)
            return SimpleNamespace(error=None)

    import ray.tune.integration.ray_train as tune_train

    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t_00000"))
    monkeypatch.setattr(tune_train, "TuneReportCallback", lambda: None)  # needs a live Tune session
    specs: list[RunSpec] = []

    def build(spec: RunSpec, device: str, data: Path, run_dir: Path, *a: Any, **k: Any) -> Trainer:
        specs.append(spec)
        return Trainer(run_dir)

    monkeypatch.setattr(sweep, "build_trainer", build)
    base = RunSpec.model_validate({"data": {"cache_dir": str(tmp_path / "cache"), "max_documents": 20,
                                            "seq_len": 32}}).model_dump(mode="json")
    with pytest.raises(RuntimeError, match=r"^training stopped: non-finite loss at step 7"):
        sweep.run_trial({"train.lr": 0.001}, base=base, linked={}, sweep_dir=str(tmp_path), device="cpu")
    trial = next(tmp_path.glob("t_00000-*"))
    assert json.loads((trial / "train" / "stopped.json").read_text())["step"] == 7
    # a trial skips the step-0 eval unless its spec asks for it
    with pytest.raises(RuntimeError):
        sweep.run_trial({"train.eval_at_start": True}, base=base, linked={}, sweep_dir=str(tmp_path), device="cpu")
    assert [s.train.eval_at_start for s in specs] == [False, True]


def test_named_logs_are_copied_into_the_run_folder(tmp_path: Path) -> None:
    """A private Ray's temp dir (and its logs) is deleted after the driver exits: the line names a copy."""
    ray_logs = tmp_path / "ray" / "session" / "logs"
    ray_logs.mkdir(parents=True)
    (ray_logs / "worker-a-77.err").write_text("Traceback ...\nValueError: boom\n")
    run_dir = tmp_path / "runs" / "r1"
    workers: dict[int, dict[str, Any]] = {0: {"pid": 77, "log": str(ray_logs / "worker-a-77.err")},
                                          1: {"pid": 78, "log": "/elsewhere/on/another/node.err"}}
    keep_logs(workers, run_dir)
    copy = run_dir / "logs" / "rank0-pid77-worker-a-77.err"
    assert workers[0]["log"] == str(copy) and copy.read_text().endswith("ValueError: boom\n")
    assert workers[1]["log"] == "/elsewhere/on/another/node.err"  # not visible here: left as it was
    assert str(copy) in failure_line({0: DIED}, workers)
