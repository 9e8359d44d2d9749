"""Where the seconds before the first optimizer step go, and the threads a worker gets.

A run stamps wall-clock milestones (``time.time()``, comparable between the driver and workers on one
machine): the driver when the spec is read, data prepared and Ray up (a one-worker run on this machine has
no Ray: orchestrator.local.supervisor; its worker process starts with the data preparation); rank 0 when its function starts,
its engine is built, its runner is ready (resumed or not), its loop starts (after the step-0 eval: 0 s when
``train.eval_at_start`` is false or the run resumed) and its first optimizer step ends. The
driver prints one line from them and keeps them in ``summary.json`` (``startup``: seconds since the
command started), which is also what ``difflm bench`` reads for the full `difflm train` path.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from orchestrator.spec.run import RunSpec

# Milestones in order, with the name of the phase that ends at each (shown in the start-up line).
PHASES: dict[str, str] = {
    "spec": "CLI + spec",
    "data": "data",
    "ray": "Ray start",
    "worker": "worker up",
    "engine": "model + engine",
    "ready": "runner + resume",
    "loop": "step-0 eval",
    "step1": "first step",
}


def process_start_time() -> float:
    """Wall time this process was created: the command's start, interpreter and imports included."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # no psutil or no /proc: the caller's own start is the next best thing
        return time.time()


def auto_cpus_per_worker(num_workers: int, node_cpus: list[float]) -> int:
    """``scaling.cpus_per_worker: auto`` for one run: the most whole CPUs per worker such that all
    ``num_workers`` workers fit on the nodes (each node's CPUs, as Ray counts them), at least 1.

    On one machine that is its CPUs over the workers; on a cluster a worker never straddles nodes,
    so 2 workers on nodes of 6 and 2 CPUs get 3 each (both on the first), not 4."""
    for per_worker in range(int(max(node_cpus, default=1)), 1, -1):
        if sum(int(n // per_worker) for n in node_cpus) >= num_workers:
            return per_worker
    return 1


def resolve_cpus(spec: RunSpec, node_cpus: list[float], log: Callable[[str], None]) -> RunSpec:
    """``spec`` with ``scaling.cpus_per_worker: auto`` replaced by :func:`auto_cpus_per_worker` for
    these nodes (``log`` says what it picked); any other value is kept."""
    s = spec.scaling
    if s.cpus_per_worker != "auto":
        return spec
    n = auto_cpus_per_worker(s.num_workers, node_cpus)
    log(f"cpus_per_worker {n} (auto: {s.num_workers} worker(s), {sum(node_cpus):g} CPUs)")
    return spec.model_copy(update={"scaling": s.model_copy(update={"cpus_per_worker": float(n)})})


def worker_threads(cpus_per_worker: float) -> int:
    """Intra-op threads for a worker: the CPUs Ray reserves for it, at least one.

    Ray's job environment pins OMP_NUM_THREADS=1 for its own processes (controller, queues, Tune's
    trial actors); a training worker that inherited it would run at one core whatever it reserved."""
    return max(1, int(cpus_per_worker))


def thread_env(cpus_per_worker: float) -> dict[str, str]:
    """Environment of a training worker's process: OpenMP/MKL pools sized before torch starts them."""
    n = str(worker_threads(cpus_per_worker))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def seconds_since(started_at: float, stamps: dict[str, float]) -> dict[str, float]:
    """Absolute stamps -> seconds since the command started, in milestone order."""
    return {k: round(stamps[k] - started_at, 3) for k in PHASES if k in stamps}


def describe(started_at: float, stamps: dict[str, float]) -> str:
    """One line: 'first optimizer step 8.1 s after start (CLI + spec 1.2 s, data 0.0 s, Ray start 3.0 s, ...)'."""
    parts, prev = [], started_at
    for key, phase in PHASES.items():
        if key in stamps:
            parts.append(f"{phase} {stamps[key] - prev:.1f} s")
            prev = stamps[key]
    total = stamps.get("step1", prev) - started_at
    return f"first optimizer step {total:.1f} s after start ({', '.join(parts)})"
