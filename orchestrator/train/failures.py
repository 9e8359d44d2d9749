"""Worker failures in one line: the root cause and where the worker's log is, not Ray's wall of text.

Each worker announces itself at start (rank, pid, log file) through the console queue; a
Ray Train callback on the controller forwards every worker-group failure as one line per
rank; the driver prints one line per restart and, when Ray gives up, raises
:class:`TrainingFailed` with the same one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator import raycompat

DIED = "died (killed by a signal such as SIGKILL or the out-of-memory killer, or crashed)"


class TrainingFailed(RuntimeError):
    """Training failed after Ray Train's retries; the message is one line (cause + worker log)."""


def worker_log_path() -> str | None:
    """The file this Ray worker's stderr goes to (Ray redirects it into the session's logs folder)."""
    try:
        target = os.readlink("/proc/self/fd/2")
    except OSError:
        target = ""
    if target.startswith("/") and Path(target).is_file():
        return target
    try:  # not Linux: Ray names worker logs worker-<id>-<job>-<pid>.err
        folder = raycompat.logs_dir()
        if folder is None:
            return None
        logs = Path(folder)
        found = sorted(logs.glob(f"worker-*-{os.getpid()}.err"))
        return str(found[-1]) if found else None
    except Exception:
        return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def summarize(exc: BaseException) -> str:
    """One line for a worker's exception: ``died (...)`` for a lost process, else ``Type: last line``."""
    from ray.exceptions import RayActorError

    inner = raycompat.health_check_failure(exc)
    if isinstance(exc, RayActorError) or isinstance(inner, RayActorError):
        return DIED
    if inner is not None:
        exc = inner
    name = type(exc).__name__
    line = _last_line(str(exc))
    if line.startswith(name):
        return line
    return f"{name}: {line}" if line else name


def keep_logs(workers: dict[int, dict[str, Any]], run_dir: Path) -> None:
    """Copy each announced worker log into ``RUN_DIR/logs/`` and point ``workers`` at the copies.

    A private Ray's logs live in its temp dir, which its watchdog deletes once the driver exits
    (orchestrator.cluster.private): the path a failure line names must outlive the run. Logs on
    another node (a cluster) are not visible here and keep their original path."""
    import shutil

    for rank, info in workers.items():
        src = info.get("log")
        if not src or not Path(src).is_file() or Path(src).is_relative_to(run_dir):
            continue
        dest = run_dir / "logs" / f"rank{rank}-pid{info.get('pid', 'unknown')}-{Path(src).name}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        except OSError:
            continue
        info["log"] = str(dest)


def failure_line(errors: dict[int, str], workers: dict[int, dict[str, Any]]) -> str:
    """``worker rank 1 (pid 123) died (...); its log: /tmp/ray/.../worker-...err`` (first failing rank;
    the others usually fail as a consequence)."""
    if not errors:
        return "the worker group failed (no worker reported an error)"
    rank = min(errors, key=lambda r: (errors[r] != DIED, r)) if any(v == DIED for v in errors.values()) else min(errors)
    info = workers.get(rank, {})
    pid = f" (pid {info['pid']})" if info.get("pid") else ""
    log = f"; its log: {info['log']}" if info.get("log") else ""
    others = len(errors) - 1
    more = f" ({others} other rank{'s' if others > 1 else ''} failed with it)" if others else ""
    return f"worker rank {rank}{pid} {errors[rank]}{more}{log}"


def failure_reporter(queue: Any) -> Any:
    """A Ray Train UserCallback (runs on the controller) that sends each worker-group failure to ``queue``."""
    from ray.train import UserCallback

    class FailureReporter(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            try:
                queue.put_nowait(("failure", {"errors": {int(r): summarize(e) for r, e in worker_exceptions.items()}}))
            except Exception:  # a full or gone queue must never break Ray's failure handling
                pass

    return FailureReporter()


def explain_fit_error(exc: BaseException, workers: dict[int, dict[str, Any]]) -> TrainingFailed | None:
    """A one-line :class:`TrainingFailed` for Ray Train's final error (None: not a worker failure)."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return TrainingFailed(failure_line({int(r): summarize(e) for r, e in failures.items()}, workers))
    return None
