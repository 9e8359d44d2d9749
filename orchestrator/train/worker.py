"""The function every Ray Train worker runs: build the family, wrap it in an engine, resume, run the loop.

Rank 0 writes TensorBoard, names and links checkpoints and sends progress events through a
Ray queue to the driver's console; every rank reports to Ray Train (``ray.train.report`` is a
barrier in Train V2) and says where its log goes, so a failure names the right file.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from difflm.data import load_prepared
from orchestrator.devices import configure_device, peak_memory_above, precision_problem, start_memory_window
from orchestrator.errors import SpecError, TrainingStopped
from orchestrator.spec.run import spec_from_dict
from orchestrator.build import build_run
from orchestrator.rundir.ckpt_files import checkpoint_dir_name, pick_resume_checkpoint, prune_orphans, update_links
from orchestrator.train.engine import deepspeed_cpu_op_notice, effective_zero_stage
from orchestrator.train.failures import worker_log_path
from orchestrator.train.metrics import NullLogger, TensorBoardLogger
from orchestrator.train.precision import resolve_precision
from orchestrator.rundir.run_folder import write_stop
from orchestrator.train.runner import Runner, WorkerContext
from orchestrator.train.startup import thread_env, worker_threads


class _StampedRunner(Runner):
    """A Runner that calls ``on_first_step(loop_start, step_end)`` once, after its first optimizer step.

    The first ``train_step`` starts right after the step-0 eval (or the resume), so its start and end
    stamp the last two start-up phases without touching the loop itself."""

    def __init__(self, *args: Any, on_first_step: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_first_step = on_first_step

    def train_step(self) -> None:
        if self._on_first_step is None:
            return super().train_step()
        start = time.time()
        super().train_step()
        callback, self._on_first_step = self._on_first_step, None
        callback(start, time.time())


def _broadcast(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (the Train worker group's torch process group)."""
    if world <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class WorkerHost(Protocol):
    """Where the training function runs: a Ray Train worker (:class:`RayTrainHost`) or, for a one-worker
    sweep trial, the Tune trial actor itself (``orchestrator.sweep.in_trial.TrialHost``)."""

    rank: int
    world: int

    def device(self, kind: str) -> torch.device: ...

    def preferred_checkpoint(self) -> Path | None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None) -> None:
        """Hand ``metrics`` (and the checkpoint in ``checkpoint_dir``, to be kept as ``run_dir/name``) on."""


class RayTrainHost:
    """A Ray Train worker: rank and world from ``ray.train.get_context()``; Ray Train copies each
    checkpoint into the run folder and keeps its registry (``checkpoint_manager_snapshot.json``)."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, kind: str) -> torch.device:
        if kind == "cuda":
            from ray.train.torch import get_device

            return get_device()
        return torch.device(kind)

    def preferred_checkpoint(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return Path(ckpt.path) if ckpt is not None else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)), checkpoint_dir_name=name)


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs inside each Ray Train worker: build model + engine, resume, run the loop, report to Ray."""
    entered = time.time()
    return run_worker(config, RayTrainHost(), entered)


def run_worker(config: dict[str, Any], host: WorkerHost, entered: float | None = None) -> dict[str, Any]:
    """The training function of one rank, wherever it runs (``host``): build model + engine, resume, run
    the loop, report. ``config`` is :func:`orchestrator.train.trainer.loop_config`'s dict."""
    entered = time.time() if entered is None else entered
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    spec = spec_from_dict(config["spec"])
    # The CPUs Ray reserved for this worker, as intra-op threads (the process env already says so: see
    # build_trainer's worker_runtime_env; set here too in case torch started its pool earlier).
    os.environ.update(thread_env(spec.scaling.cpus_per_worker))
    torch.set_num_threads(worker_threads(spec.scaling.cpus_per_worker))
    queue = config.get("queue")
    run_dir = Path(config["run_dir"])
    rank, world = host.rank, host.world
    device = host.device(config["device"])

    def put(kind: str, payload: dict[str, Any]) -> None:
        if queue is not None:
            try:
                queue.put_nowait((kind, payload))
            except Exception:  # a full or gone queue must never stop training
                pass

    def emit(kind: str, payload: dict[str, Any]) -> None:
        if rank == 0:
            put(kind, payload)

    # Every rank says where its log goes, so a failure names the right file.
    put("worker", {"rank": rank, "pid": os.getpid(), "log": worker_log_path()})
    # summary.json's peak_memory_bytes counts from here (`difflm bench` shows it). Libraries the run
    # loads anyway are imported first so their code is not counted as the run's memory: torch.optim
    # imports torch._dynamo with the first optimizer, the engine imports DeepSpeed.
    importlib.import_module("torch._dynamo")
    if spec.scaling.deepspeed and device.type != "mps":
        importlib.import_module("deepspeed")
    memory_baseline = start_memory_window(device)
    data = load_prepared(Path(config["data_dir"]))
    # `auto` the driver could not resolve (a cluster's GPUs it cannot see)
    spec, picked = resolve_precision(spec, device.type, data.tokenizer.vocab_size)
    if picked and rank == 0:
        emit("log", {"message": picked})
    problem = precision_problem(device.type, spec.train.precision)  # the driver checked what it could see
    if problem is not None:
        raise SpecError(problem)
    configured = configure_device(device)
    if configured and rank == 0:
        emit("log", {"message": configured})

    def announce(model: Any) -> Any:  # between building the model and wrapping it in the engine
        if rank == 0:
            emit("log", {"message": f"model: {spec.model.family}, {model.num_parameters():,} parameters"})
        notice = deepspeed_cpu_op_notice() if (rank == 0 and device.type == "cpu" and spec.scaling.deepspeed) else None
        if notice is not None:
            emit("log", {"message": notice})
        return model

    # model, engine and LR schedule as every other caller builds them; the runner below (it needs the
    # report hooks defined after the engine's start-up stamp)
    engine = build_run(spec, data, device, model_hook=announce).engine
    stamps = {"worker": entered, "engine": time.time()}
    threads = f"{torch.get_num_threads()} thread(s) each"
    if rank == 0:
        if spec.scaling.deepspeed and engine.backend == "torch":
            emit("log", {"message": f"DeepSpeed has no {device.type} accelerator: running plain PyTorch, {threads}"})
        elif engine.backend == "torch":
            mode = "DDP" if world > 1 else "single process"
            emit("log", {"message": f"engine: torch ({mode}) on {device}, {world} worker(s), {threads}"})
        else:
            stage = effective_zero_stage(spec)
            note = "" if stage == spec.scaling.zero_stage else f"; ZeRO-{spec.scaling.zero_stage} partitions from 2 workers"
            emit("log", {"message": f"engine: deepspeed (ZeRO-{stage}) on {device}, {world} worker(s), {threads}{note}"})
    logger = TensorBoardLogger(Path(config["tb_dir"])) if (rank == 0 and spec.output.tensorboard) else NullLogger()

    nodes = worker_nodes(world, device)
    started_at = config.get("started_at")
    startup_reported = False

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        nonlocal startup_reported
        if started_at is not None and "step1" in stamps and not startup_reported:
            # Once, with the first report after the first step: a sweep trial's start-up lands in Tune's results.
            startup_reported = True
            metrics = {**metrics, "startup/first_step_s": stamps["step1"] - started_at}
            if config.get("process_started_at") is not None:  # an in-trial run: from its actor's creation on
                metrics["startup/process_first_step_s"] = stamps["step1"] - config["process_started_at"]
        # worker_nodes lands in each sweep trial's result.json: where the trial's workers ran
        metrics = {**metrics, "worker_nodes": nodes}
        if checkpoint_dir is None:
            host.report(metrics, None, None)
            return
        # Rank 0 names the folder (Ray syncs the name to every rank); "checkpoint_time" ranks checkpoints
        # for Ray's retention: it keeps train.keep_checkpoints most recent ones.
        name = checkpoint_dir_name(run_dir, int(metrics["step"])) if rank == 0 else None
        host.report({**metrics, "checkpoint_time": time.time()}, checkpoint_dir, name)
        name = _broadcast(name, world)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank's files are in place before rank 0 links them
        if rank == 0:
            update_links(run_dir, run_dir / name, is_best=metrics["val/nll"] <= metrics["val/best_nll"])
            prune_orphans(run_dir)

    def first_step(loop_start: float, step_end: float) -> None:
        stamps.update(loop=loop_start, step1=step_end)
        emit("startup", dict(stamps))

    runner = _StampedRunner(
        spec, data, engine, WorkerContext(rank, world, device), logger=logger, report=report, emit=emit,
        val_dir=Path(config["val_dir"]) if config.get("val_dir") else None, on_first_step=first_step,
    )
    preferred = host.preferred_checkpoint()
    chosen = None
    if rank == 0:
        log = lambda msg: emit("log", {"message": msg})  # noqa: E731
        info = pick_resume_checkpoint(run_dir, preferred, log)
        chosen = str(info.path) if info is not None else None
    chosen = _broadcast(chosen, world)
    if chosen is not None:
        runner.load(Path(chosen))
    emit("start", {"step": runner.step, "checkpoint": chosen})
    if chosen is not None:
        emit("log", {"message": f"resumed from step {runner.step} ({Path(chosen).name})"})
    stamps["ready"] = time.time()  # the step-0 eval (if any) is what runs between this and "loop"
    try:
        summary = runner.run()
    except TrainingStopped as exc:  # not retried: a restart would reach the same point again
        if rank == 0:
            write_stop(run_dir, str(exc), runner.step)
        logger.close()
        return {}
    summary["threads"] = torch.get_num_threads()
    summary["peak_memory_bytes"] = peak_memory_above(device, memory_baseline)
    summary["worker_nodes"] = nodes  # summary.json: which Ray node each rank ran on
    summary["exact_likelihood"] = bool(engine.module.exact_likelihood)  # val/nll exact (ar) or a bound: the CLI says which
    emit("done", summary)
    return summary


def worker_nodes(world: int, device: torch.device) -> list[str]:
    """The Ray node id of every rank, in rank order (the same list on every rank).

    Recorded in summary.json and in each report, so a run on a cluster shows where it ran
    (``difflm cluster status`` shows the same ids).
    """
    import ray

    # "local": the function runs outside any Ray worker (tests drive a trial's function in-process)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    if world == 1 or not torch.distributed.is_initialized():
        return [node]
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, node)
    return [str(n) for n in gathered]
