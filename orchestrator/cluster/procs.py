"""Find and stop the processes of one Ray instance on this machine, and only those.

Why not ``ray stop``: it stops every Ray process of the user on the machine, including
other people's and other commands' instances. A Ray node is identified here by a
folder it owns instead: its temp dir (``ray.init(_temp_dir=...)``, ``ray start --temp-dir``)
or its session dir. Ray's own daemons (gcs_server, raylet, dashboard, log monitor) name that
folder on their command line; its workers and agents rename themselves (``ray::IDLE``,
``ray::DashboardAgent``) but keep their log files open under it. So a process belongs to
the instance when its command line names the folder or it holds a file open in it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Iterable

import psutil


def _pattern(root: Path) -> re.Pattern[str]:
    # The folder itself or anything under it, as a whole path (``/tmp/r1`` must not match ``/tmp/r10``).
    return re.compile(r"(?<![\w./-])" + re.escape(str(root).rstrip("/")) + r"(?=/|\s|$|['\",;:])")


def _own_lineage() -> set[int]:
    """This process and its ancestors: never candidates (a test runner may name the folder too)."""
    out = set()
    proc: psutil.Process | None = psutil.Process()
    while proc is not None:
        out.add(proc.pid)
        try:
            proc = proc.parent()
        except psutil.Error:
            break
    return out


def processes_under(root: str | Path, *, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """Live processes of this user whose command line names ``root`` or that hold a file open under it."""
    root = Path(root)
    pattern = _pattern(root)
    prefix = str(root).rstrip("/") + "/"
    skip = _own_lineage() | set(exclude)
    uid = os.getuid()
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "cmdline", "uids"]):
        info = proc.info
        if info["pid"] in skip or info["uids"] is None or info["uids"].real != uid:
            continue
        cmd = " ".join(info["cmdline"] or [])
        if pattern.search(cmd):
            found.append(proc)
            continue
        try:
            if any(f.path.startswith(prefix) for f in proc.open_files()):
                found.append(proc)
        except psutil.Error:  # gone, or not ours to inspect
            continue
    return found


def stop_processes(procs: list[psutil.Process], *, timeout: float = 5.0) -> int:
    """SIGTERM (Ray's daemons shut down cleanly on it), then SIGKILL what is left after ``timeout``.

    Returns how many of ``procs`` were running when called.
    """
    alive = []
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
            alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    _, still = psutil.wait_procs(alive, timeout=timeout)
    for proc in still:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(still, timeout=timeout)
    return len(alive)


def is_alive(pid: int, create_time: float | None = None) -> bool:
    """Whether ``pid`` runs and, given ``create_time``, is still the same process (pids get reused)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def wait_for_exit(pid: int, create_time: float | None, poll_s: float = 0.5) -> None:
    """Block until ``pid`` exits: a pidfd wakes at once on Linux; otherwise poll."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # already gone
        try:
            if not is_alive(pid, create_time):  # pid reused before we opened it
                return
            import select

            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while not poller.poll(60_000):
                pass
            return
        finally:
            os.close(fd)
    while is_alive(pid, create_time):
        time.sleep(poll_s)
