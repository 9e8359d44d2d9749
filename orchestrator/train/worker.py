"""The function every Ray Train worker runs: build the family, wrap it in an engine, resume, run the loop.

Rank 0 writes TensorBoard, names and links checkpoints and sends progress events through a
Ray queue to the driver's console; every rank reports to Ray Train (``ray.train.report`` is a
barrier in Train V2) and says where its log goes, so a failure names the right file.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from difflm.data import load_prepared
from difflm.families import build_model
from orchestrator.errors import TrainingStopped
from orchestrator.spec.run import spec_from_dict
from orchestrator.train.checkpoints import special_ids
from orchestrator.train.ckpt_files import checkpoint_dir_name, pick_resume_checkpoint, prune_orphans, update_links
from orchestrator.train.engine import build_engine
from orchestrator.train.failures import worker_log_path
from orchestrator.train.metrics import NullLogger, TensorBoardLogger
from orchestrator.train.run_folder import write_stop
from orchestrator.train.runner import Runner, WorkerContext


def _broadcast(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (the Train worker group's torch process group)."""
    if world <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs inside each Ray Train worker: build model + engine, resume, run the loop, report to Ray."""
    import ray.train
    from ray.train import Checkpoint

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    spec = spec_from_dict(config["spec"])
    queue = config.get("queue")
    run_dir = Path(config["run_dir"])
    ctx_ray = ray.train.get_context()
    rank, world = ctx_ray.get_world_rank(), ctx_ray.get_world_size()
    device_kind = config["device"]
    if device_kind == "cuda":
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device(device_kind)

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
    torch.manual_seed(spec.train.seed)
    data = load_prepared(Path(config["data_dir"]))
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size, **special_ids(data.tokenizer))
    if rank == 0:
        emit("log", {"message": f"model: {spec.model.family}, {model.num_parameters():,} parameters"})
    engine = build_engine(model, spec, device)
    if rank == 0:
        if spec.scaling.deepspeed and engine.backend == "torch":
            emit("log", {"message": f"DeepSpeed has no {device.type} accelerator: running plain PyTorch"})
        elif engine.backend == "torch":
            emit("log", {"message": f"engine: torch ({'DDP' if world > 1 else 'single process'}) on {device}, {world} worker(s)"})
        else:
            emit("log", {"message": f"engine: deepspeed (ZeRO-{spec.scaling.zero_stage}) on {device}, {world} worker(s)"})
    logger = TensorBoardLogger(Path(config["tb_dir"])) if (rank == 0 and spec.output.tensorboard) else NullLogger()

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        # Rank 0 names the folder (Ray syncs the name to every rank); "checkpoint_time" ranks checkpoints
        # for Ray's retention: it keeps train.keep_checkpoints most recent ones.
        name = checkpoint_dir_name(run_dir, int(metrics["step"])) if rank == 0 else None
        ray.train.report({**metrics, "checkpoint_time": time.time()},
                         checkpoint=Checkpoint.from_directory(str(checkpoint_dir)), checkpoint_dir_name=name)
        name = _broadcast(name, world)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank's files are in place before rank 0 links them
        if rank == 0:
            update_links(run_dir, run_dir / name, is_best=metrics["val/nll"] <= metrics["val/best_nll"])
            prune_orphans(run_dir)

    runner = Runner(spec, data, engine, WorkerContext(rank, world, device), logger=logger, report=report, emit=emit,
                    val_dir=Path(config["val_dir"]) if config.get("val_dir") else None)
    preferred = ray.train.get_checkpoint()
    chosen = None
    if rank == 0:
        log = lambda msg: emit("log", {"message": msg})  # noqa: E731
        info = pick_resume_checkpoint(run_dir, Path(preferred.path) if preferred is not None else None, log)
        chosen = str(info.path) if info is not None else None
    chosen = _broadcast(chosen, world)
    if chosen is not None:
        runner.load(Path(chosen))
    emit("start", {"step": runner.step, "checkpoint": chosen})
    if chosen is not None:
        emit("log", {"message": f"resumed from step {runner.step} ({Path(chosen).name})"})
    try:
        summary = runner.run()
    except TrainingStopped as exc:  # not retried: a restart would reach the same point again
        if rank == 0:
            write_stop(run_dir, str(exc), runner.step)
        logger.close()
        return {}
    emit("done", summary)
    return summary
