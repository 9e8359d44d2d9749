"""difflm's private Ray instance does not outlive its driver (orchestrator/cluster/: procs, private, watchdog).

The fast tests stand in for Ray with plain processes that behave like the daemons Ray leaves
behind (own session, a log file open under the instance's temp dir); the slow one SIGKILLs a
real `difflm train` and checks that every process it started is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from orchestrator.cluster import private
from orchestrator.cluster.procs import is_alive, processes_under, stop_processes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short DIFFLM_RUNTIME_DIR (Ray's socket paths must stay under 107 bytes), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="dlt", dir="/tmp"))
    monkeypatch.setenv("DIFFLM_RUNTIME_DIR", str(d))
    yield d
    stop_processes(processes_under(d), timeout=2)
    subprocess.run(["rm", "-rf", str(d)], check=False)


def _daemon(hold: Path | None = None, arg: str | None = None) -> subprocess.Popen[bytes]:
    """A long sleeper in its own session (like Ray's agents after the driver is gone): holds ``hold`` open
    and/or names ``arg`` on its command line."""
    code = "import sys, time\n" + (f"f = open({str(hold)!r}, 'a')\n" if hold else "") + "time.sleep(120)\n"
    return subprocess.Popen(
        [sys.executable, "-c", code, *([arg] if arg else [])], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _wait_gone(pid: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not is_alive(pid):
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"pid {pid} still alive after {timeout} s")


def test_processes_under_matches_cmdline_and_open_files_only(tmp_path: Path) -> None:
    root, sibling = tmp_path / "r1", tmp_path / "r10"
    for d in (root, sibling):
        (d / "logs").mkdir(parents=True)
    by_cmd = _daemon(arg=f"--temp-dir={root}")
    by_file = _daemon(hold=root / "logs" / "agent.out")
    other = _daemon(hold=sibling / "logs" / "agent.out", arg=f"--log_dir={sibling}/logs")
    try:
        time.sleep(1.0)  # let the interpreters open their files
        found = {p.pid for p in processes_under(root)}
        assert found == {by_cmd.pid, by_file.pid}
        assert {p.pid for p in processes_under(sibling)} == {other.pid}
        assert stop_processes(processes_under(root), timeout=5) == 2
        assert not is_alive(by_cmd.pid) and not is_alive(by_file.pid) and is_alive(other.pid)
    finally:
        for p in (by_cmd, by_file, other):
            p.kill()
            p.wait()


DRIVER = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    from orchestrator.cluster.private import start_private_ray

    def fake_init(_temp_dir, **kwargs):
        # what Ray leaves after a SIGKILL: a process in its own session with a log open in the temp dir
        log = Path(_temp_dir) / "session_x" / "logs" / "agent.out"
        log.parent.mkdir(parents=True)
        child = subprocess.Popen([sys.executable, "-c", f"f = open({str(log)!r}, 'a'); import time; time.sleep(120)"],
                                 start_new_session=True)
        print(child.pid, _temp_dir, flush=True)

    start_private_ray(fake_init, {}, print)
    time.sleep(120)
    """
)


def _start_driver(runtime: Path) -> tuple[subprocess.Popen[str], int, Path]:
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "DIFFLM_RUNTIME_DIR": str(runtime)},
    )
    assert driver.stdout is not None
    child, temp_dir = driver.stdout.readline().split()
    return driver, int(child), Path(temp_dir)


def test_watchdog_stops_what_a_sigkilled_driver_left(runtime: Path) -> None:
    driver, child, temp_dir = _start_driver(runtime)
    owner = json.loads((temp_dir / private.OWNER_FILE).read_text())
    assert owner["pid"] == driver.pid and is_alive(owner["watchdog_pid"])
    assert temp_dir.parent == runtime / "ray" and len(str(temp_dir)) <= private.MAX_TEMP_DIR_LEN
    time.sleep(0.5)
    assert is_alive(child)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    took = _wait_gone(child, timeout=15)
    _wait_gone(owner["watchdog_pid"], timeout=10)
    assert not temp_dir.exists()
    assert took < 10, took


def test_stale_instance_is_reported_and_stopped(runtime: Path) -> None:
    """The watchdog itself was killed too: the next private start finds the leftovers and says so."""
    driver, child, temp_dir = _start_driver(runtime)
    watchdog = json.loads((temp_dir / private.OWNER_FILE).read_text())["watchdog_pid"]
    os.kill(watchdog, signal.SIGKILL)
    _wait_gone(watchdog, timeout=5)
    live_driver, live_child, live_dir = _start_driver(runtime)  # another driver, still running
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1.0)
    assert is_alive(child)  # nobody watched it
    try:
        (stale,) = [i for i in private.list_instances() if private.is_stale(i)]
        assert stale.temp_dir == temp_dir
        messages: list[str] = []
        reaped = private.reap_stale(messages.append)
        assert [i.temp_dir for i in reaped] == [temp_dir]
        assert len(messages) == 1 and f"driver pid {driver.pid}" in messages[0] and "stopped its 1 process" in messages[0]
        assert not is_alive(child) and not temp_dir.exists()
        assert is_alive(live_child) and live_dir.exists()  # a running driver's instance is left alone
    finally:
        live_driver.kill()
        live_driver.wait()
        _wait_gone(live_child, timeout=15)


def test_too_long_runtime_dir_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFFLM_RUNTIME_DIR", str(tmp_path / ("x" * 40)))
    from orchestrator.errors import SpecError

    with pytest.raises(SpecError, match=r"DIFFLM_RUNTIME_DIR=.* too long for Ray's socket paths"):
        private.start_private_ray(lambda **kw: None, {}, print)
    assert not list((tmp_path / ("x" * 40) / "ray").iterdir())


TINY = """
model: {family: mdlm, size: null, d_model: 32, n_layers: 1, n_heads: 2, cond_dim: 16}
diffusion: {sample_steps: 4}
data: {source: builtin, seq_len: 32, max_documents: 100, cache_dir: %(tmp)s/cache}
train: {max_steps: 100000, micro_batch_size: 4, warmup_steps: 1, eval_every: 5, checkpoint_every: 100000, log_every: 5,
        num_samples: 0}
scaling: {num_workers: 1, device: cpu, zero_stage: 0}
output: {dir: %(tmp)s/runs, name: killed}
"""


@pytest.mark.slow
def test_sigkilled_train_leaves_no_ray_processes(runtime: Path, tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY % {"tmp": tmp_path})
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "train", str(spec), "--set", "scaling.launcher=ray"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            # scaling.launcher=ray: Ray Train even for one worker (a one-worker run on this machine starts no Ray by default)
            env={**os.environ, "PYTHONPATH": str(REPO), "DIFFLM_RUNTIME_DIR": str(runtime), "PYTHONUNBUFFERED": "1"},
        )
    me = psutil.Process(driver.pid)
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 300
    while "eval step 10:" not in log.read_text():  # training is under way: every Ray process is up
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        for c in me.children(recursive=True):
            try:
                seen[c.pid] = c.create_time()
            except psutil.Error:
                pass
        time.sleep(0.5)
    (temp_dir,) = (runtime / "ray").iterdir()
    under = processes_under(temp_dir)
    names = {p.name() for p in under}
    assert "raylet" in names and "gcs_server" in names and len(under) >= 5, names
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    start = time.monotonic()
    while time.monotonic() - start < 30:
        left = [pid for pid, ct in seen.items() if is_alive(pid, ct)] + [p.pid for p in processes_under(runtime)]
        if not left:
            break
        time.sleep(0.5)
    assert not left, [psutil.Process(p).cmdline()[:2] for p in left if is_alive(p)]
    assert not temp_dir.exists()
    assert len(seen) >= 10  # the driver had started Ray's daemons and workers


def test_private_start_retries_when_its_dashboard_port_was_taken(runtime: Path) -> None:
    """The dashboard port is chosen before Ray starts (so every worker can be pointed at it); if another Ray
    takes it in between, Ray fails to bind and difflm tries again with another port and a fresh instance."""
    from orchestrator.cluster.connect import start_or_join

    calls: list[dict] = []

    def fake_init(**kwargs: object) -> None:
        calls.append(kwargs)
        if len(calls) == 1:
            raise RuntimeError("Failed to find a valid port for dashboard after 0 retries: address already in use")

    start_or_join(None, fake_init, {"runtime_env": {"env_vars": {"A": "1"}}}, log=print)
    assert len(calls) == 2 and calls[0]["_temp_dir"] != calls[1]["_temp_dir"]
    port = calls[1]["dashboard_port"]
    assert calls[1]["runtime_env"]["env_vars"] == {"A": "1", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    assert "py_modules" not in calls[1]["runtime_env"]  # a private instance's workers import from this machine
    with pytest.raises(ValueError, match="something else"):
        start_or_join(None, lambda **kw: (_ for _ in ()).throw(ValueError("something else")), {}, log=print)
