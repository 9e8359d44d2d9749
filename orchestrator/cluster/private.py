"""difflm's private Ray instance: started for one driver, gone when that driver is.

``ray.init()`` without an address starts Ray's daemons as children of the driver and
ties most of them to it (``PR_SET_PDEATHSIG``), but not all: after a SIGKILL of the driver
the raylet's dashboard agent and runtime-env agent notice their raylet is gone, try to
report it to the (also dead) GCS and hang there for good (measured with Ray 2.60, see
docs/scaling.md). So difflm gives each private instance

- its own temp dir, ``$DIFFLM_RUNTIME_DIR/ray/<pid>-<random>/`` (default runtime dir
  ``/tmp/difflm-<uid>``), which names every process of the instance (``procs.py``);
- an ``owner.json`` there (driver pid and start time, command, watchdog pid);
- a watchdog process (``python -m orchestrator.cluster.watchdog``, its own session so a
  Ctrl-C or a SIGKILL of the driver does not reach it) that waits for the driver to exit, for
  any reason, then stops whatever is left under the temp dir and deletes it.

Every later private start first looks for instances whose driver and watchdog are both
gone (the watchdog itself was killed, or the machine was rebooted mid-run), stops their
processes and says so.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from orchestrator.cluster.procs import is_alive, processes_under, stop_processes
from orchestrator.errors import SpecError

OWNER_FILE = "owner.json"
#: Unix sockets live under the temp dir (``session_<date>_<pid>/sockets/plasma_store``, ~62
#: characters) and Linux caps a socket path at 107 bytes.
MAX_TEMP_DIR_LEN = 44


def runtime_dir() -> Path:
    """Where difflm keeps per-machine state: private Ray temp dirs, records of started nodes."""
    return Path(os.environ.get("DIFFLM_RUNTIME_DIR") or f"/tmp/difflm-{os.getuid()}")


def private_root() -> Path:
    return runtime_dir() / "ray"


@dataclass
class Instance:
    """One private Ray instance folder and what its owner file says."""

    temp_dir: Path
    owner: dict[str, Any]

    @property
    def driver_alive(self) -> bool:
        return bool(self.owner) and is_alive(int(self.owner["pid"]), self.owner.get("create_time"))

    @property
    def watchdog_alive(self) -> bool:
        wd = self.owner.get("watchdog_pid")
        return wd is not None and is_alive(int(wd), self.owner.get("watchdog_create_time"))

    @property
    def command(self) -> str:
        return str(self.owner.get("command", "?"))

    @property
    def started(self) -> str:
        return str(self.owner.get("started", "?"))


def list_instances() -> list[Instance]:
    """Every private instance folder on this machine (this user), oldest first."""
    root = private_root()
    out = []
    for d in sorted(root.glob("*"), key=lambda p: p.stat().st_mtime if p.exists() else 0):
        if not d.is_dir():
            continue
        try:
            owner = json.loads((d / OWNER_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            owner = {}
        out.append(Instance(d, owner))
    return out


def is_stale(inst: Instance, min_age_s: float = 60.0) -> bool:
    """Neither its driver nor its watchdog runs (a folder without owner file counts once it is a minute old)."""
    if not inst.owner:
        try:
            return time.time() - inst.temp_dir.stat().st_mtime > min_age_s
        except OSError:
            return False
    return not inst.driver_alive and not inst.watchdog_alive


def reap(inst: Instance) -> int:
    """Stop the instance's processes and delete its folder; return how many processes were stopped."""
    n = stop_processes(processes_under(inst.temp_dir))
    shutil.rmtree(inst.temp_dir, ignore_errors=True)
    return n


def reap_stale(log: Callable[[str], None]) -> list[Instance]:
    """Find instances left by drivers that are gone, stop their processes, delete their folders, say so."""
    reaped = []
    for inst in list_instances():
        if not is_stale(inst):
            continue
        n = reap(inst)
        if n:
            log(
                f"found a stale private Ray instance of `{inst.command}` (driver pid {inst.owner.get('pid', '?')}, "
                f"started {inst.started}) that outlived its driver: stopped its {n} process(es)"
            )
        reaped.append(inst)
    return reaped


def _command_line() -> str:
    return " ".join(["difflm", *sys.argv[1:]]) if sys.argv else "difflm"


def _spawn_watchdog(temp_dir: Path, pid: int, create_time: float) -> subprocess.Popen[bytes]:
    log = open(temp_dir / "watchdog.log", "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cluster.watchdog", str(pid), repr(create_time), str(temp_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not in the driver's process group: Ctrl-C / kill -PGID miss it
            close_fds=True,
        )
    finally:
        log.close()


def start_private_ray(init: Callable[..., Any], kwargs: dict[str, Any], log: Callable[[str], None]) -> Path:
    """Reap stale instances, create this driver's temp dir and watchdog, then ``init(_temp_dir=..., **kwargs)``.

    The watchdog starts before Ray, so a driver killed while Ray starts leaves nothing either.
    Returns the temp dir.
    """
    root = private_root()
    root.mkdir(parents=True, exist_ok=True)
    reap_stale(log)
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    if len(str(temp_dir)) > MAX_TEMP_DIR_LEN:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise SpecError(
            f"DIFFLM_RUNTIME_DIR={runtime_dir()} is too long for Ray's socket paths "
            f"(the private temp dir {temp_dir} has {len(str(temp_dir))} characters, at most {MAX_TEMP_DIR_LEN}); "
            "use a short folder such as /tmp/difflm"
        )
    me = psutil.Process()
    owner: dict[str, Any] = {
        "pid": me.pid,
        "create_time": me.create_time(),
        "command": _command_line(),
        "cwd": os.getcwd(),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    watchdog = _spawn_watchdog(temp_dir, me.pid, me.create_time())
    owner["watchdog_pid"] = watchdog.pid
    owner["watchdog_create_time"] = psutil.Process(watchdog.pid).create_time()
    (temp_dir / OWNER_FILE).write_text(json.dumps(owner, indent=2))
    init(_temp_dir=str(temp_dir), **kwargs)
    return temp_dir
