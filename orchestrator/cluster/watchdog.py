"""The watchdog of one private Ray instance: ``python -m orchestrator.cluster.watchdog PID CREATE_TIME TEMP_DIR``.

Started by :func:`orchestrator.cluster.private.start_private_ray` in its own session. It
sleeps until the driver ``PID`` exits (clean exit, exception, Ctrl-C or SIGKILL alike),
gives Ray a moment to shut itself down, then stops every process still holding the
instance's temp dir (see ``procs.py``) and deletes the folder. It imports neither Ray nor
torch, so it costs a few MB and no CPU while it waits.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import sys
import time
from pathlib import Path

from orchestrator.cluster.procs import processes_under, stop_processes, wait_for_exit

#: seconds between the driver's exit and the sweep: a clean ``ray.shutdown()`` has finished by
#: then, and Ray's own fate-sharing has taken down the daemons it covers
GRACE_S = 1.0


def watch(pid: int, create_time: float, temp_dir: Path, grace_s: float = GRACE_S) -> int:
    """Wait for ``pid`` to exit, stop what is left under ``temp_dir``, delete it; return how many processes were stopped."""
    wait_for_exit(pid, create_time)
    time.sleep(grace_s)
    # Ray's agents left behind hang in a GCS call and ignore SIGTERM: do not wait long for them.
    n = stop_processes(processes_under(temp_dir), timeout=2.0)
    # Logs of a stopped instance are of no further use; a stale one would be reported later.
    print(f"{_dt.datetime.now().isoformat(timespec='seconds')} driver {pid} exited; stopped {n} process(es)", flush=True)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return n


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m orchestrator.cluster.watchdog PID CREATE_TIME TEMP_DIR", file=sys.stderr)
        return 2
    watch(int(argv[0]), float(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
