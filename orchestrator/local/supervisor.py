"""A one-worker `difflm train` on this machine: one worker process the driver supervises, no Ray.

Why: under Ray Train a single-worker run on one machine started a private Ray (GCS, raylet, agents:
3-4 s on 2 cores) and two Python processes one after the other (Train V2's controller, then the
worker, each importing Ray and torch: 6-7 s) before its engine was built: 13-15 s to the first step
for a run whose training fits in one process. Ray's features such a run used are few and small:
a process to survive (a SIGKILL or the OOM killer must not end the command), a restart from the
latest checkpoint up to ``scaling.max_failures``, the checkpoint folder and its retention, and the
console events. Here:

* the worker is ``python -m orchestrator.local.worker``, started right after the spec is read,
  so its imports overlap the driver's data preparation and checks (:class:`LocalWorker`);
* it trains with :func:`orchestrator.train.worker.run_worker` and the same host as a one-worker sweep
  trial (:class:`orchestrator.sweep.in_trial.TrialHost`: checkpoints copied into the run folder under a
  hidden name then renamed, ``train.keep_checkpoints`` most recent kept, resume from the newest that
  verifies), so the numbers are those of the Ray Train path (tests/test_in_trial.py checks bit-identity);
* its stdout/stderr go to ``RUN_DIR/logs/rank0-pid<PID>-worker.log`` (the file a failure line names);
* a failure (exit code, signal, or the worker's own error line) prints one line and starts a new worker
  that resumes from the latest checkpoint, as Ray Train's ``FailureConfig`` did; after
  ``max_failures`` restarts the command fails with that line (:class:`TrainingFailed`).

Runs that need Ray keep Ray Train: several workers, ``--address`` (a cluster), or
``scaling.launcher: ray`` in the spec (:func:`runs_locally`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

from orchestrator.devices import worker_env
from orchestrator.train.failures import DIED, TrainingFailed, failure_line
from orchestrator.train.startup import thread_env

#: Folder of the run that holds each worker process's log.
LOGS = "logs"


def runs_locally(num_workers: int, address: str | None, launcher: str = "auto") -> bool:
    """Whether a run trains in one supervised worker process (this module) rather than under Ray Train.

    ``launcher`` is ``scaling.launcher``: ``auto`` picks this module for one worker on this machine,
    ``ray`` never does, ``local`` insists (a SpecError naming the fix when the run needs Ray Train)."""
    needs_ray = address is not None or num_workers != 1
    if launcher == "local" and needs_ray:
        from orchestrator.errors import SpecError

        why = "--address (a Ray cluster)" if address is not None else f"scaling.num_workers={num_workers}"
        raise SpecError(f"scaling.launcher=local trains one worker on this machine, but the run has {why}; "
                        "use scaling.launcher=auto (Ray Train for it) or one worker without --address")
    return launcher != "ray" and not needs_ray


class LocalWorker:
    """One training worker process and its end of the event socket (see the module docstring)."""

    def __init__(self, run_dir: Path, cpus_per_worker: float, device_type: str = "cpu") -> None:
        self.logs = run_dir / LOGS
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.imported: float | None = None  # when its imports were done (its "imported" event)
        self.conn, child = Pipe(duplex=True)
        pending = self.logs / f".starting-{os.getpid()}-{time.monotonic_ns()}.log"
        # The package this driver runs from comes first on the worker's path: the same code on both sides.
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
        env = {**os.environ, **thread_env(cpus_per_worker), **worker_env(device_type), "PYTHONPATH": path,
               "PYTHONUNBUFFERED": "1"}
        self.device_type = device_type
        with open(pending, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.local.worker", str(child.fileno()), str(os.getpid())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        child.close()
        self.log = self.logs / f"rank0-pid{self.proc.pid}-worker.log"
        os.replace(pending, self.log)  # the worker keeps writing to it under its final name
        self.pid = self.proc.pid
        self.error: str | None = None

    def send(self, config: dict[str, Any]) -> None:
        self.conn.send(config)

    def events(self, timeout: float = 1.0) -> Any:
        """Yield (kind, payload) until the worker's socket closes (it exited or died)."""
        while True:
            try:
                if not self.conn.poll(timeout):
                    if self.proc.poll() is not None and not self.conn.poll(0):
                        return
                    continue
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                return
            if kind == "error":
                self.error = str(payload.get("message", ""))
            elif kind == "imported":
                self.imported = float(payload["at"])
            yield kind, payload

    def outcome(self) -> str | None:
        """None when the worker finished its run, else the one-line cause (as Ray Train's summarize gives)."""
        code = self.proc.wait()
        if code == 0 and self.error is None:
            return None
        if self.error is not None:
            return self.error
        return DIED if code < 0 else f"exited with code {code} (no error reported; see its log)"

    def stop(self, grace_s: float = 5.0) -> None:
        """End the worker (Ctrl-C, an error in the driver); remove its log if it never got a run."""
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def overlap_note(worker: LocalWorker, started_at: float) -> str:
    """``worker process: started 2.5 s, imports done 4.1 s`` (seconds since the command started): what ran
    beside the driver's data and checks, which the sequential phases of the start-up line do not show."""
    done = "" if worker.imported is None else f", imports done {worker.imported - started_at:.1f} s"
    return f"worker process: started {worker.started - started_at:.1f} s{done} (beside the driver's data and checks)"


def discard_unused(worker: LocalWorker) -> None:
    """Stop a worker started ahead of a run that never began (a user error after the prestart) and leave
    no trace of it in the run folder."""
    worker.stop(grace_s=1.0)
    worker.log.unlink(missing_ok=True)
    for folder in (worker.logs, worker.logs.parent):
        try:
            folder.rmdir()  # only if empty: never a run's own files
        except OSError:
            break


def supervise(
    worker: LocalWorker,
    config: dict[str, Any],
    run_dir: Path,
    cpus_per_worker: float,
    max_failures: int,
    console: Any,
    on_event: Any,
    current: list[Any] | None = None,
) -> tuple[int, LocalWorker]:
    """Run the loop config on ``worker``, restarting a failed worker up to ``max_failures`` times
    (-1: no limit). ``on_event(kind, payload)`` gets every event. Returns (restarts, last worker);
    raises :class:`TrainingFailed` with the failure line once no restart is left. ``current[0]``, if given,
    is kept pointing at the worker whose events ``on_event`` receives."""
    restarts = 0
    current = [worker] if current is None else current
    while True:
        current[0] = worker
        worker.send(config)
        for kind, payload in worker.events():
            on_event(kind, payload)
        cause = worker.outcome()
        if cause is None:
            return restarts, worker
        line = failure_line({0: cause}, {0: {"pid": worker.pid, "log": str(worker.log)}})
        if max_failures >= 0 and restarts >= max_failures:
            raise TrainingFailed(line)
        left = "no limit" if max_failures < 0 else f"{max_failures - restarts} left"
        console.info(f"worker failure: {line} (restarting from the latest checkpoint; restarts so far: {restarts}, {left})")
        restarts += 1
        worker = LocalWorker(run_dir, cpus_per_worker, worker.device_type)
