"""The Ray a difflm driver runs on: difflm's environment for Ray's processes, then a private
instance or an existing cluster (:func:`orchestrator.cluster.connect.start_or_join`).

    init_ray(None)                 # private Ray for this driver (gone when the driver is)
    init_ray(None, dashboard=True) # the same with its dashboard (a sweep: Tune needs the state API)
    init_ray("auto")               # the cluster `ray start --head` / `difflm cluster up` started
"""

from __future__ import annotations

import logging
import os
from typing import Any

from orchestrator import raycompat
from orchestrator.cluster.connect import start_or_join

# The Train controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), which throttles ray.train.report; we report only at eval points, and
# a shorter interval keeps short runs and ASHA decisions snappy.
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray's 60 s for a worker process to come up is exceeded on a loaded 2-core box (seen: sweep trials
    # failing with WorkerGroupStartupTimeoutError at load ~20); resources are checked before Ray starts.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray's own processes (controller, queue, Tune trial actors) need no thread pools; training workers
    # override this with their cpus_per_worker (build_trainer's worker_runtime_env).
    "OMP_NUM_THREADS": "1",
    # Tune's own progress box and tables: `difflm sweep` draws its own.
    "RAY_AIR_NEW_OUTPUT": "0",
}

# Only for a Ray this command starts on one machine (each a process less to start on every run):
# nothing drains a local node, so no preemption watcher actor; no dashboard/Prometheus reads Ray
# Train's metrics. Set either variable yourself to keep the feature.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


# Only for a private Ray without a dashboard (a single `difflm train`): its actors all carry their own
# runtime env, so the two workers Ray prestarts for the driver's job would idle through the run
# (~0.4 CPU-s each while the controller starts).
LONE_RAY_ENV = {"RAY_prestart_worker_first_driver": "0"}

#: Set by init_ray when this process started a private Ray without a dashboard (see lone_private_ray).
_LONE_PRIVATE = False


def lone_private_ray() -> bool:
    """True when this process runs on a private Ray it started without a dashboard (a single
    `difflm train`): no state API, and nothing outlives this driver (orchestrator.train.trainer)."""
    return _LONE_PRIVATE


def init_ray(address: str | None, dashboard: bool = False) -> None:
    """Start (or join) Ray quietly. A private instance (no ``address``) has token authentication on
    (``RAY_AUTH_MODE=token``: every RPC and dashboard request needs the token Ray keeps in
    ``~/.ray/auth_token``) and, with ``dashboard``, its dashboard on 127.0.0.1 (Tune needs its state
    API to free stopped trials; a single run does without it and saves its processes' start-up: a
    dashboard head and ten module processes, ~3 CPU-seconds on a 2-core box). Ray's own gRPC
    servers (GCS, raylet, workers) listen on all interfaces whatever the node address; the token is
    what keeps others out (see docs/reliability.md)."""
    import ray

    if ray.is_initialized():
        return
    env = dict(RAY_ENV)
    local_dashboard = dashboard and address is None
    if address is None:
        env.update({k: v for k, v in LOCAL_RAY_ENV.items() if k not in os.environ})
    if address is None and not local_dashboard:
        env.update({k: v for k, v in LONE_RAY_ENV.items() if k not in os.environ})
    os.environ.update(env)
    if address is None and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        # Read by every process ray.init starts; Ray caches its config at import, so refresh it
        # the way Ray's own default-enabling code does (orchestrator.raycompat.refresh_ray_config).
        os.environ["RAY_AUTH_MODE"] = "token"
        raycompat.refresh_ray_config()
    kwargs: dict[str, Any] = dict(
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": env},
        include_dashboard=local_dashboard,
    )
    if local_dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    # a private instance that dies with this driver (its dashboard port pinned for the state API),
    # or the cluster with the project code shipped
    start_or_join(address, ray.init, kwargs)
    global _LONE_PRIVATE
    _LONE_PRIVATE = address is None and not local_dashboard
    if address is None:
        _prestart_autoscaling_coordinator()
    _quiet_worker_startup_warning()
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _prestart_autoscaling_coordinator() -> None:
    """Start the actor every Ray Train controller asks for its resources, now, in the background.

    The controller creates Ray Data's detached ``AutoscalingCoordinator`` on first use and waits
    for it (a Python process importing Ray: ~1.3 s on 2 cores) before it starts any worker. Started
    here, right after a private Ray comes up, it imports while the driver and the controller do
    theirs. The same function, so the controller finds it by name; best effort: on failure the
    controller starts it as before."""
    try:
        raycompat.prestart_autoscaling_coordinator()  # non-blocking: returns the handle, the process starts
    except Exception:  # another Ray version: nothing is lost but the head start
        logging.getLogger(__name__).debug("autoscaling coordinator not prestarted", exc_info=True)


def _quiet_worker_startup_warning() -> None:
    """Drop two raylet messages from the console.

    "N worker processes have been started": Tune trials hold a 0.01-CPU actor each (see
    sweep.py), which the raylet reads as "too many workers for the CPU count" and announces
    on every sweep; it is expected here and hides the sweep table. "A worker died or was
    killed ...": a 600-character paragraph per dead worker, which orchestrator.train.failures
    replaces with one line. Every other raylet message still prints.
    """
    raycompat.filter_driver_log_lines(_noisy_raylet_lines)


def _noisy_raylet_lines(data: dict[str, Any]) -> bool:
    """Whether a batch of log lines is one of the two raylet messages difflm drops (see above)."""
    lines = data.get("lines", [])
    return data.get("pid") == "raylet" and any(
        "worker processes have been started" in ln or "A worker died or was killed" in ln for ln in lines
    )
