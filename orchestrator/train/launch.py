"""`difflm train` as a Ray Train job: resource checks, ``TorchTrainer`` launch and the per-worker function.

Flow: the driver validates the spec, tokenizes (cached) so errors surface before
Ray starts, checks resources, starts/joins Ray, then runs ``TorchTrainer`` with
:func:`train_fn_per_worker` on ``scaling.num_workers`` workers. Each worker builds
the family, wraps it in DeepSpeed (plain torch on MPS) and hands the loop to
:class:`orchestrator.runner.Runner`. Rank 0 writes TensorBoard and sends progress
events through a Ray queue to the driver's console.
"""

from __future__ import annotations

import json
import os
import time
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflm.atomic import atomic_write_text
from difflm.data import prepare_data
from orchestrator.cluster.connect import alive_nodes, check_shared_storage
from orchestrator.cluster.session import init_ray, lone_private_ray
from orchestrator.devices import precision_problem, resolve_device
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec
from orchestrator.spec.yamlio import spec_yaml
from orchestrator.train.console import TrainConsole
from orchestrator.train.precision import resolve_precision
from orchestrator.train.startup import describe, process_start_time, resolve_cpus, seconds_since
from orchestrator.local.supervisor import LocalWorker, discard_unused, overlap_note, runs_locally, supervise
from orchestrator.train.trainer import build_trainer, loop_config

#: The driver's own last event in the console queue, put when trainer.fit() returns.
FIT_ENDED = "fit-ended"


# ---------------------------------------------------------------- resources
def check_resources(spec: RunSpec, device: str, cpus: float, gpus: float, where: str) -> None:
    """SpecError when the machine/cluster cannot give what the spec asks for."""
    s = spec.scaling
    need_cpus = s.num_workers * s.cpus_per_worker
    if need_cpus > cpus + 1e-9:
        raise SpecError(
            f"scaling: {s.num_workers} workers x {s.cpus_per_worker:g} CPUs = {need_cpus:g} CPUs, but {where} has "
            f"{cpus:g}; lower scaling.num_workers or scaling.cpus_per_worker"
        )
    if device == "cuda":
        if gpus <= 0:
            raise SpecError(
                f"scaling.device is cuda but {where} has no GPU (torch.cuda.is_available() is False); "
                "use device: cpu or auto"
            )
        need = s.num_workers * s.gpus_per_worker
        if need > gpus + 1e-9:
            raise SpecError(
                f"scaling: {s.num_workers} workers x {s.gpus_per_worker:g} GPUs = {need:g} GPUs, but {where} has "
                f"{gpus:g}; lower scaling.num_workers"
            )
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise SpecError("scaling.device is mps but this machine has no Apple MPS device; use cpu or auto")
        if s.num_workers != 1:
            raise SpecError("scaling.device mps supports one worker (one Apple GPU); set scaling.num_workers: 1")


def local_resources() -> tuple[float, float]:
    return float(os.cpu_count() or 1), float(torch.cuda.device_count() if torch.cuda.is_available() else 0)


# ------------------------------------------------------------------- driver
@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    tensorboard_dir: Path


def prepare_and_place(
    spec: RunSpec,
    address: str | None,
    console: TrainConsole,
    stamps: dict[str, float] | None = None,
    dashboard: bool = False,
    start_ray: bool = True,
) -> tuple[RunSpec, Any, str, float, float]:
    """Driver set-up shared by train and sweep: check resources, tokenize (cached), start or join Ray.

    Returns (spec with ``cpus_per_worker`` resolved, prepared data, device, CPUs, GPUs). Order keeps user errors before Ray: this machine
    is checked before tokenizing; a cluster can only be checked after joining it. Tokenizing on
    the driver makes data errors surface before a private Ray starts; workers read the cache. A
    cluster is checked right after joining it (resources, and paths every node must see), before
    tokenizing. ``stamps`` receives the wall times the data and Ray were ready (the start-up report).
    ``start_ray=False``: a run on this machine without Ray (orchestrator.local.supervisor).
    """
    stamps = {} if stamps is None else stamps
    if address is None:
        cpus, gpus = local_resources()
        device = resolve_device(spec.scaling.device)
        spec = resolve_cpus(spec, [cpus], console.info)
        check_resources(spec, device, cpus, gpus, "this machine")
    else:  # joining is cheap: check the cluster (resources, shared paths) before tokenizing
        import ray

        init_ray(address)
        res = ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        device = resolve_device(spec.scaling.device, gpus)
        nodes = alive_nodes()
        spec = resolve_cpus(spec, [n.get("Resources", {}).get("CPU", 0.0) for n in nodes], console.info)
        check_resources(spec, device, cpus, gpus, f"the cluster at {address}")
        check_shared_storage({"output.dir": spec.output.dir, "data.cache_dir": spec.data.cache_dir}, len(nodes))
    runner = None
    if address is not None:  # joined above: tokenize on the cluster's CPUs with Ray Data
        from orchestrator.data.ray_runner import ray_data_runner

        runner = ray_data_runner()
    prepared = prepare_data(spec.data, spec.tokenizer, log=console.info, runner=runner)
    stamps["data"] = time.time()
    if address is None and start_ray:  # a cluster was joined above, before tokenizing
        init_ray(None, dashboard)
    if start_ray or address is not None:
        stamps["ray"] = time.time()
    return spec, prepared, device, cpus, gpus


def launch_train(
    spec: RunSpec,
    *,
    address: str | None = None,
    console: TrainConsole | None = None,
    resume: bool = False,
    allow_spec_change: bool = False,
    started_at: float | None = None,
) -> TrainResult:
    """Check the run folder, prepare data, check resources, run the TorchTrainer, return the result.

    ``resume``: continue the run in the spec's folder (Ray restores its latest checkpoint; difflm falls
    back to an older one if that is damaged). Without it a folder that holds a run is an error.
    ``started_at``: wall time the command started (default: this process's creation), the zero of
    the start-up report (summary.json ``startup``).
    """
    from orchestrator.rundir.run_folder import STOP_FILE, check_run_folder

    started_at = process_start_time() if started_at is None else started_at
    stamps = {"spec": time.time()}
    console = console or TrainConsole()
    name = spec.run_name()
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"name": name})})
    storage = Path(spec.output.dir).expanduser().resolve()
    run_dir = storage / name
    check_run_folder(run_dir, spec.model_dump(mode="json"), resume=resume, allow_spec_change=allow_spec_change)

    worker = None
    if runs_locally(spec.scaling.num_workers, address, spec.scaling.launcher):
        # One worker on this machine: no Ray (orchestrator.local.supervisor). Its process starts now, so that its
        # imports overlap the data preparation and checks below; it waits for the config.
        spec = resolve_cpus(spec, [local_resources()[0]], console.info)
        worker = LocalWorker(run_dir, float(spec.scaling.cpus_per_worker), resolve_device(spec.scaling.device))
    try:
        return _launch_prepared(spec, address, console, resume, run_dir, started_at, stamps, worker)
    except BaseException:
        if worker is not None and worker.proc.poll() is None and not (run_dir / "spec.yaml").exists():
            discard_unused(worker)
        elif worker is not None:
            worker.stop()
        raise


def _launch_prepared(spec: RunSpec, address: str | None, console: TrainConsole, resume: bool, run_dir: Path,
                     started_at: float, stamps: dict[str, float], worker: LocalWorker | None) -> TrainResult:
    """launch_train once the run folder is checked (and a local worker started): data, resources, run."""
    from orchestrator.rundir.run_folder import STOP_FILE

    spec, prepared, device, _, _ = prepare_and_place(spec, address, console, stamps, start_ray=worker is None)
    if address is None:  # this machine is where the workers run: name the precision in spec.yaml
        spec, chosen = resolve_precision(spec, device, prepared.tokenizer.vocab_size)
        if chosen:
            console.info(chosen)
        problem = precision_problem(device, spec.train.precision)
        if problem is not None:
            raise SpecError(problem)
    console.info(
        f"data: {len(prepared.train):,} train / {len(prepared.val):,} val blocks of {spec.data.seq_len} tokens, "
        f"vocab {prepared.tokenizer.vocab_size:,}"
    )

    s, t = spec.scaling, spec.train
    global_batch = t.micro_batch_size * t.grad_accum * s.num_workers
    console.info(
        f"run: {run_dir}{' (resuming)' if resume else ''}\nbatch: {t.micro_batch_size} micro x {s.num_workers} workers "
        f"x {t.grad_accum} accum = {global_batch} sequences ({global_batch * spec.data.seq_len:,} tokens) per step, "
        f"{t.max_steps} steps"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "spec.yaml", spec_yaml(spec))
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a previous session's stop reason is not this one's
    tb_dir = run_dir / "tensorboard"
    if worker is not None:
        return _fit_local(spec, device, prepared.cache_dir, run_dir, tb_dir, console, started_at, stamps, worker)
    return _fit(spec, device, prepared.cache_dir, run_dir, tb_dir, console, started_at, stamps)


def read_links(run_dir: Path) -> tuple[Path | None, Path | None]:
    """(best, last) checkpoint folders from RUN_DIR/checkpoints/{best,last} (kept by rank 0 as it goes)."""
    out = []
    for name in ("best", "last"):
        link = run_dir / "checkpoints" / name
        out.append(link.resolve() if link.exists() else None)
    return out[0], out[1]


def _fit(
    spec: RunSpec,
    device: str,
    data_dir: Path,
    run_dir: Path,
    tb_dir: Path,
    console: TrainConsole,
    started_at: float,
    stamps: dict[str, float],
) -> TrainResult:
    from ray.util.queue import Empty, Queue

    from orchestrator.train.failures import explain_fit_error, failure_line, failure_reporter, keep_logs

    queue = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(spec, device, data_dir, run_dir, tb_dir, queue, callbacks=[failure_reporter(queue)],
                            started_at=started_at, pg_cleaner=not lone_private_ray())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the main thread
            box["error"] = exc
        finally:  # behind every event of the run in the queue: the console loop can stop here
            try:
                queue.put_nowait((FIT_ENDED, None))
            except Exception:  # a gone queue actor: the loop notices the dead thread instead
                pass

    thread = threading.Thread(target=target, name="difflm-fit", daemon=True)
    thread.start()
    summary: dict[str, Any] = {}
    workers: dict[int, dict[str, Any]] = {}  # rank -> pid, log of the current worker group
    starts, failure_shown = 0, True
    max_failures = spec.scaling.max_failures
    try:
        while True:
            try:
                # A long blocking get: the queue actor wakes once per event, not 4 times a second
                # beside the training worker (it shares the CPUs on a laptop or a 2-core box).
                kind, payload = queue.get(timeout=2.0)
            except Empty:
                if thread.is_alive():
                    continue
                break
            if kind == FIT_ENDED:
                break
            if kind == "done":
                summary = payload
            elif kind == "worker":
                workers[int(payload["rank"])] = payload
            elif kind == "start":
                starts += 1
                failure_shown = False
            elif kind == "failure":
                restarts_left = max_failures < 0 or starts - 1 < max_failures
                # Ray polls a failed group more than once: one line per failure; the last one, after which
                # Ray gives up, is the error the CLI prints.
                if not failure_shown and restarts_left:
                    keep_logs(workers, run_dir)
                    failure_shown = True
                    left = "no limit" if max_failures < 0 else f"{max_failures - (starts - 1)} left"
                    console.info(f"worker failure: {failure_line(payload['errors'], workers)} "
                                 f"(restarting from the latest checkpoint; restarts so far: {starts - 1}, {left})")
            elif kind == "startup":  # rank 0 after its first optimizer step
                stamps.update(payload)
                console.info(describe(started_at, stamps))
            else:
                console.handle(kind, payload)
    finally:
        console.close()
    thread.join()
    error = box.get("error") or getattr(box.get("result"), "error", None)
    if error is not None:
        keep_logs(workers, run_dir)
        raise explain_fit_error(error, workers) or error
    result = box["result"]
    return _finish(run_dir, tb_dir, summary or dict(result.metrics or {}), max(0, starts - 1), started_at, stamps)


def _fit_local(
    spec: RunSpec,
    device: str,
    data_dir: Path,
    run_dir: Path,
    tb_dir: Path,
    console: TrainConsole,
    started_at: float,
    stamps: dict[str, float],
    worker: LocalWorker,
) -> TrainResult:
    """The run in one supervised worker process (orchestrator.local.supervisor): same events, same summary."""
    summary: dict[str, Any] = {}
    overlap: dict[str, float] = {}
    current = [worker]  # the worker whose events these are (a restart replaces it)

    def on_event(kind: str, payload: dict[str, Any]) -> None:
        if kind == "done":
            summary.update(payload)
        elif kind == "startup":
            stamps.update(payload)
            console.info(f"{describe(started_at, stamps)}; {overlap_note(current[0], started_at)}")
            overlap["worker_started"] = round(current[0].started - started_at, 3)
            if current[0].imported is not None:
                overlap["worker_imported"] = round(current[0].imported - started_at, 3)
        elif kind not in ("worker", "start", "imported", "error", "exit"):
            console.handle(kind, payload)

    config = loop_config(spec, device, data_dir, run_dir, tb_dir, None, started_at)
    try:
        restarts, worker = supervise(worker, config, run_dir, float(spec.scaling.cpus_per_worker),
                                     spec.scaling.max_failures, console, on_event, current)
    except BaseException:  # Ctrl-C, or the driver's own error: the current worker (a restart's, maybe) stops too
        current[0].stop()
        raise
    finally:
        console.close()
    if overlap:
        summary["startup_worker_process"] = overlap  # seconds since the command started (beside the phases)
    return _finish(run_dir, tb_dir, summary, restarts, started_at, stamps)


def _finish(run_dir: Path, tb_dir: Path, summary: dict[str, Any], restarts: int, started_at: float,
            stamps: dict[str, float]) -> TrainResult:
    """summary.json (restarts, start-up, a stop's reason) and the result; TrainingStopped for a stopped run."""
    from orchestrator.errors import TrainingStopped
    from orchestrator.rundir.run_folder import read_stop

    best, last = read_links(run_dir)
    summary["restarts"] = restarts
    summary["startup"] = seconds_since(started_at, stamps)
    stop = read_stop(run_dir)
    if stop is not None:
        summary["stopped"] = stop["reason"]
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    if stop is not None:
        raise TrainingStopped(stop["reason"])
    return TrainResult(run_dir, summary, best, last, tb_dir)
