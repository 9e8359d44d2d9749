"""`difflm cluster up|down`: Ray's own commands, with the settings difflm needs and a safe stop.

- ``up`` on the head: ``ray start --head`` (dashboard on 127.0.0.1, token authentication on);
  on another machine: ``ray start --address HEAD:PORT``; with ``--config X.yaml`` (a Ray
  cluster-launcher file): ``ray up``. What ``ray start`` started is recorded (node id, session
  dir) under ``$DIFFLM_RUNTIME_DIR/nodes/``.
- ``down`` stops exactly the nodes ``up`` started on this machine, by their session dir
  (``procs.py``), never with ``ray stop``, which would take down every Ray instance of the
  user on the machine. With ``--config``: ``ray down``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from orchestrator import raycompat
from orchestrator.cluster.private import runtime_dir
from orchestrator.cluster.procs import processes_under, stop_processes
from orchestrator.errors import SpecError

DEFAULT_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
#: `ray start` waits for the GCS it joins without a limit of its own
START_TIMEOUT_S = 180
DEFAULT_TEMP_DIR = "/tmp/ray"


@dataclass
class NodeRecord:
    """A Ray node `difflm cluster up` started on this machine."""

    role: str  # "head" | "worker"
    address: str  # the cluster's GCS address, HOST:PORT
    node_id: str
    session_dir: str
    temp_dir: str
    started: str

    @property
    def path(self) -> Path:
        return records_dir() / f"{self.node_id}.json"


def records_dir() -> Path:
    return runtime_dir() / "nodes"


def load_records() -> list[NodeRecord]:
    out = []
    for f in sorted(records_dir().glob("*.json")):
        try:
            out.append(NodeRecord(**json.loads(f.read_text())))
        except (OSError, TypeError, json.JSONDecodeError):
            continue
    return out


def ray_exe() -> str:
    """The `ray` of this environment (next to the running Python), so nodes run the same Ray as the driver."""
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def _has_token() -> bool:
    try:
        return raycompat.has_auth_token()
    except Exception:
        return False


def _auth_env(auth: bool, generate: bool) -> tuple[dict[str, str], str]:
    """Environment for `ray start` and a line saying how authentication is set up."""
    env = dict(os.environ)
    if not auth:
        env["RAY_AUTH_MODE"] = "disabled"
        return env, "token authentication: off (--no-auth): anyone who reaches the ports can run code here"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return env, "token authentication: off (RAY_AUTH_MODE=disabled in the environment)"
    if not _has_token():
        if not generate:
            raise SpecError(
                "this machine has no Ray token for the cluster: copy the head's ~/.ray/auth_token here (or export "
                "RAY_AUTH_TOKEN=<token>), or join without authentication with --no-auth"
            )
        subprocess.run([ray_exe(), "get-auth-token", "--generate"], check=True, capture_output=True, text=True)
    env["RAY_AUTH_MODE"] = "token"
    return env, (
        "token authentication: on (the token is in ~/.ray/auth_token, or RAY_AUTH_TOKEN if set); "
        "every joining node and every driver needs the same token"
    )


def _daemons(name: str) -> dict[int, str]:
    """pid -> command line of this machine's Ray daemons called ``name`` (raylet, gcs_server)."""
    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.info["name"] == name and p.info["cmdline"]:
            out[p.info["pid"]] = " ".join(p.info["cmdline"])
    return out


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _arg(cmd: str, name: str) -> str | None:
    m = re.search(rf"--{name}=(\S+)", cmd)
    return m.group(1) if m else None


def _run_ray_start(args: list[str], env: dict[str, str], temp_dir: str) -> dict[str, str]:
    """Run `ray start ARGS`; return the new raylet's node id, session dir and GCS address.

    A failed start can leave daemons behind (its GCS, monitor): they are found by the session dir
    of the GCS/raylet that was not there before and stopped, so a failure leaves nothing running.
    """
    before = set(_daemons("raylet")) | set(_daemons("gcs_server"))
    try:
        proc = subprocess.run(
            [ray_exe(), "start", *args], env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S
        )
        failed, output = proc.returncode != 0, proc.stderr + proc.stdout
    except subprocess.TimeoutExpired as exc:  # e.g. the head it joins is gone
        failed = True
        output = f"{exc.stderr or ''}{exc.stdout or ''}\nno answer after {START_TIMEOUT_S} s (is the head running?)"
    if failed:
        for name, key in (("gcs_server", "session-dir"), ("raylet", "session_dir")):
            for pid, cmd in _daemons(name).items():
                session = _arg(cmd, key)
                if pid not in before and session and session.startswith(temp_dir.rstrip("/") + "/"):
                    stop_processes(processes_under(session), timeout=5.0)
        tail = [ln for ln in str(output).splitlines() if ln.strip()][-3:]
        raise SpecError(f"`ray start {' '.join(args)}` failed: {' / '.join(t.strip() for t in tail)}")
    new = {pid: cmd for pid, cmd in _daemons("raylet").items() if pid not in before and _arg(cmd, "temp_dir") == temp_dir}
    if not new:
        raise SpecError(f"`ray start {' '.join(args)}` reported success but no new raylet runs with temp dir {temp_dir}")
    cmd = new[max(new, key=lambda pid: psutil.Process(pid).create_time())]
    return {
        "node_id": _arg(cmd, "node_id") or "?",
        "session_dir": _arg(cmd, "session_dir") or "?",
        "address": _arg(cmd, "gcs-address") or "?",
    }


def _common_args(num_cpus: float | None, num_gpus: int | None, temp_dir: str) -> list[str]:
    args = [f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus:g}")
    if num_gpus is not None:
        args.append(f"--num-gpus={num_gpus}")
    return args


def _record(role: str, found: dict[str, str], temp_dir: str) -> NodeRecord:
    rec = NodeRecord(
        role=role,
        address=found["address"],
        node_id=found["node_id"],
        session_dir=found["session_dir"],
        temp_dir=temp_dir,
        started=_dt.datetime.now().isoformat(timespec="seconds"),
    )
    rec.path.parent.mkdir(parents=True, exist_ok=True)
    rec.path.write_text(json.dumps(asdict(rec), indent=2))
    return rec


def start_head(
    port: int = DEFAULT_PORT, num_cpus: float | None = None, num_gpus: int | None = None,
    temp_dir: str = DEFAULT_TEMP_DIR, auth: bool = True, dashboard_port: int | None = None,
) -> tuple[NodeRecord, str, int]:
    """``ray start --head`` on this machine; returns its record, the authentication line and the dashboard port.

    The dashboard serves Ray's state API, which Ray Train uses to free the CPUs of stopped trials and
    `difflm cluster status` reads; `ray start` (2.60) leaves it out unless asked, and fails when its port
    is taken (another Ray on the machine), so a free one is chosen unless ``dashboard_port`` is given.
    Bound to 127.0.0.1: reach it over SSH.
    """
    from orchestrator.cluster.connect import free_port

    env, auth_line = _auth_env(auth, generate=True)
    chosen = dashboard_port or (DEFAULT_DASHBOARD_PORT if _port_free(DEFAULT_DASHBOARD_PORT) else free_port())
    for attempt in range(3):
        args = [
            "--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={chosen}", *_common_args(num_cpus, num_gpus, temp_dir),
        ]
        try:
            return _record("head", _run_ray_start(args, env, temp_dir), temp_dir), auth_line, chosen
        except SpecError as exc:
            # the port was free a moment ago and another Ray took it: pick another (unless the user chose it)
            if dashboard_port is not None or "valid port for dashboard" not in str(exc) or attempt == 2:
                raise
            chosen = free_port()
    raise AssertionError("unreachable")


def join(
    address: str, num_cpus: float | None = None, num_gpus: int | None = None,
    temp_dir: str = DEFAULT_TEMP_DIR, auth: bool = True,
) -> tuple[NodeRecord, str]:
    """``ray start --address HEAD:PORT``: this machine joins the cluster as a worker node."""
    env, auth_line = _auth_env(auth, generate=False)
    args = [f"--address={address}", *_common_args(num_cpus, num_gpus, temp_dir)]
    return _record("worker", _run_ray_start(args, env, temp_dir), temp_dir), auth_line


def stop(records: list[NodeRecord]) -> list[tuple[NodeRecord, int]]:
    """Stop recorded nodes by their session dir (worker nodes first, then heads); forget them."""
    done = []
    for rec in sorted(records, key=lambda r: r.role == "head"):
        n = stop_processes(processes_under(rec.session_dir), timeout=5.0)
        rec.path.unlink(missing_ok=True)
        done.append((rec, n))
    return done


# ------------------------------------------------------------ cluster launcher
def read_launcher_config(path: Path) -> dict[str, Any]:
    """A Ray cluster-launcher YAML, checked with Ray's own schema; SpecError otherwise."""
    from orchestrator.cluster.profile import is_ray_launcher_config
    from orchestrator.spec.yamlio import read_yaml

    raw = read_yaml(path)
    if not is_ray_launcher_config(raw):
        raise SpecError(
            f"{path}: not a Ray cluster-launcher config (no cluster_name/provider); a difflm profile is used with "
            f"`difflm train|sweep --profile {path}`"
        )
    check_launcher_config(raw, str(path))
    return raw


def check_launcher_config(raw: dict[str, Any], source: str) -> None:
    try:
        raycompat.validate_launcher_config(raw)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{source}: Ray's cluster-launcher schema rejects it: {first}") from None


def launcher(command: str, config: Path) -> int:
    """``ray up -y`` / ``ray down -y`` on a validated launcher config; returns Ray's exit code (output streams through)."""
    read_launcher_config(config)
    return subprocess.run([ray_exe(), command, "-y", str(config)]).returncode
