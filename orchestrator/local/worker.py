"""The training worker process of a one-worker `difflm train` on this machine (``python -m orchestrator.local.worker FD``).

Started by :mod:`orchestrator.local.supervisor` as soon as the driver has read the spec, so its imports (torch,
DeepSpeed, difflm's worker modules: ~2 s on 2 cores) run while the driver tokenizes, checks resources and
writes the run folder. It then waits for the loop config on its end of a socket pair (inherited fd ``FD``),
runs :func:`orchestrator.train.worker.run_worker` with :class:`orchestrator.sweep.in_trial.TrialHost` (the
run folder is the checkpoint registry, as for a sweep trial trained in its actor) and sends the worker's
events (``log``, ``progress``, ``eval``, ``startup``, ``done``) back on the same socket.

It is a separate process so that `difflm train` survives it: a SIGKILL, the out-of-memory killer or a crash
ends this process only, and the driver restarts a new one from the latest checkpoint. It exits when the
driver does (a lost driver must not leave a training process behind), and ignores Ctrl-C: the driver,
which gets it too, stops it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any


class PipeQueue:
    """The ``queue`` run_worker puts its events in: each ``put_nowait`` sends one pickled tuple to the driver.

    Errors propagate to run_worker's ``put``, which swallows them (a gone driver never stops a step: the
    parent watcher ends the process instead)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def put_nowait(self, item: Any) -> None:
        with self.lock:
            self.conn.send(item)


def _tell(queue: PipeQueue, item: Any) -> None:
    """Send ``item`` to the driver; a driver already gone (a closed socket) is not this process's error."""
    try:
        queue.put_nowait(item)
    except OSError:
        pass


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """End this process once the driver that started it is gone (its parent pid changes)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(every_s)

    threading.Thread(target=watch, name="difflm-parent-watch", daemon=True).start()


def _error_line(exc: BaseException) -> str:
    """``Type: last line of the message`` (what the driver's failure line shows)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    name = type(exc).__name__
    if lines and lines[-1].startswith(name):
        return lines[-1]
    return f"{name}: {lines[-1]}" if lines else name


def main(fd: int, parent: int) -> int:
    """Import what training needs, wait for the config, train, report; exit code 0 on success."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and stops this process
    _exit_with_parent(parent)
    conn = Connection(fd)
    queue = PipeQueue(conn)
    try:
        # The slow imports first, while the driver prepares the run (they are the point of starting early).
        import torch  # noqa: F401

        from orchestrator.sweep.in_trial import run_in_trial
    except BaseException as exc:  # noqa: BLE001: reported as the worker's failure, not a traceback on the console
        traceback.print_exc()
        _tell(queue, ("error", {"message": _error_line(exc)}))
        return 1
    _tell(queue, ("imported", {"at": time.time()}))
    try:
        config = conn.recv()
    except EOFError:  # the driver stopped before the run began (a user error): nothing to do
        return 0
    config["queue"] = queue
    try:
        run_in_trial(config, lambda metrics: None)  # the driver reads summary.json's source: run_worker's "done"
    except BaseException as exc:  # noqa: BLE001
        traceback.print_exc()
        sys.stderr.flush()
        _tell(queue, ("error", {"message": _error_line(exc)}))
        return 1
    _tell(queue, ("exit", {}))
    return 0


if __name__ == "__main__":
    code = main(int(sys.argv[1]), int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: torch/DeepSpeed atexit work is not this run's
