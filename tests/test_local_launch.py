"""A one-worker `difflm train` without Ray (orchestrator.local.supervisor): when it applies, the failure policy
(restart from the latest checkpoint up to max_failures, one line per failure), and a prestarted worker
that never got a run leaving no trace. In-process and cheap; the SIGKILL end to end is
tests/test_reliability_e2e.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

import orchestrator.local.supervisor as local
from orchestrator.errors import SpecError
from orchestrator.train.failures import DIED, TrainingFailed


def test_one_worker_on_this_machine_runs_locally() -> None:
    assert local.runs_locally(1, None)
    assert not local.runs_locally(2, None)  # several workers: Ray Train's group
    assert not local.runs_locally(1, "auto")  # a cluster: Ray Train places the worker
    assert not local.runs_locally(1, None, "ray")  # scaling.launcher: ray
    assert local.runs_locally(1, None, "local")
    with pytest.raises(SpecError, match=r"scaling.launcher=local .* scaling.num_workers=2; use scaling.launcher=auto"):
        local.runs_locally(2, None, "local")
    with pytest.raises(SpecError, match=r"--address \(a Ray cluster\)"):
        local.runs_locally(1, "10.0.0.1:6379", "local")


class _Fake:
    """A LocalWorker stand-in: replays ``events`` and ends with ``cause`` (None: success)."""

    made: list["_Fake"] = []
    plan: list[str | None] = []

    def __init__(self, run_dir: Path, cpus: float, device_type: str = "cpu") -> None:
        self.pid, self.device_type = 100 + len(_Fake.made), device_type
        self.log = run_dir / "logs" / f"rank0-pid{self.pid}-worker.log"
        self.cause = _Fake.plan[len(_Fake.made)]
        self.sent: list[dict[str, Any]] = []
        _Fake.made.append(self)

    def send(self, config: dict[str, Any]) -> None:
        self.sent.append(config)

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        yield "log", {"message": f"hello from {self.pid}"}

    def outcome(self) -> str | None:
        return self.cause


class _Console:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def _supervise(tmp_path: Path, plan: list[str | None], max_failures: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    _Fake.made, _Fake.plan = [], plan
    monkeypatch.setattr(local, "LocalWorker", _Fake)
    console, seen = _Console(), []
    first = _Fake(tmp_path, 1.0)
    out = local.supervise(first, {"spec": {}}, tmp_path, 1.0, max_failures, console,  # type: ignore[arg-type]
                          lambda k, p: seen.append((k, p["message"])))
    return out, console.lines, seen


def test_a_failed_worker_is_restarted_until_max_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (restarts, last), lines, seen = _supervise(tmp_path, [DIED, "ValueError: bad batch", None], 2, monkeypatch)
    assert restarts == 2 and last is _Fake.made[2] and all(w.sent == [{"spec": {}}] for w in _Fake.made)
    assert seen == [("log", "hello from 100"), ("log", "hello from 101"), ("log", "hello from 102")]
    log0 = tmp_path / "logs" / "rank0-pid100-worker.log"
    assert lines == [
        f"worker failure: worker rank 0 (pid 100) {DIED}; its log: {log0} "
        "(restarting from the latest checkpoint; restarts so far: 0, 2 left)",
        f"worker failure: worker rank 0 (pid 101) ValueError: bad batch; its log: {log0.with_name('rank0-pid101-worker.log')} "
        "(restarting from the latest checkpoint; restarts so far: 1, 1 left)",
    ]
    with pytest.raises(TrainingFailed, match=r"^worker rank 0 \(pid 102\) ValueError: again; its log: .*pid102"):
        _supervise(tmp_path, [DIED, DIED, "ValueError: again"], 2, monkeypatch)
    with pytest.raises(TrainingFailed):  # max_failures 0: never restarted
        _supervise(tmp_path, [DIED], 0, monkeypatch)
    (restarts, _), lines, _ = _supervise(tmp_path, [DIED] * 5 + [None], -1, monkeypatch)  # -1: no limit
    assert restarts == 5 and lines[-1].endswith("restarts so far: 4, no limit)")


def test_a_prestarted_worker_of_a_run_that_never_began_leaves_no_trace(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    worker = local.LocalWorker(run_dir, 1.0)
    assert worker.log.name == f"rank0-pid{worker.pid}-worker.log" and worker.log.is_file()
    assert "orchestrator.local.worker" in " ".join(psutil.Process(worker.pid).cmdline())
    local.discard_unused(worker)
    assert worker.proc.poll() is not None and not run_dir.exists()


def test_the_worker_exits_with_its_driver_gone(tmp_path: Path) -> None:
    """A worker whose socket closes before a config arrives (the driver stopped) exits by itself, code 0."""
    worker = local.LocalWorker(tmp_path / "run", 1.0)
    worker.conn.close()
    start = time.monotonic()
    assert worker.proc.wait(timeout=60) == 0 and time.monotonic() - start < 60



def test_the_worker_ends_when_its_driver_is_sigkilled(tmp_path: Path) -> None:
    """A SIGKILLed driver cannot stop its worker, which may be mid-step and never reading its socket: the
    worker's watcher sees its parent gone and ends it (a driver process here starts a sleeping 'worker')."""
    import os
    import signal
    import subprocess
    import sys

    worker_code = ("import os, time; from orchestrator.local.worker import _exit_with_parent; "
                   "_exit_with_parent(os.getppid(), every_s=0.1); time.sleep(600)")
    driver_code = ("import subprocess, sys, time; "
                   f"p = subprocess.Popen([sys.executable, '-c', {worker_code!r}]); print(p.pid, flush=True); "
                   "time.sleep(600)")
    driver = subprocess.Popen([sys.executable, "-c", driver_code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    assert driver.stdout is not None
    worker = psutil.Process(int(driver.stdout.readline()))
    time.sleep(0.5)  # the worker has imported and started watching
    assert worker.is_running()
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    gone, alive = psutil.wait_procs([worker], timeout=20)
    for proc in alive:  # do not leave it behind when the check fails
        proc.kill()
    assert gone, "the worker outlived its SIGKILLed driver"
