"""The function every Ray Train worker runs: build the family, wrap it in an engine, run the loop.

Rank 0 writes TensorBoard and sends progress events through a Ray queue to the driver's
console; every rank reports to Ray Train (``ray.train.report`` is a barrier in Train V2).
Resumes from ``ray.train.get_checkpoint()`` when Ray hands one over.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from difflm.data import load_prepared
from difflm.families import build_model
from orchestrator.spec.run import spec_from_dict
from orchestrator.train.checkpoints import special_ids
from orchestrator.train.engine import build_engine
from orchestrator.train.metrics import NullLogger, TensorBoardLogger
from orchestrator.train.runner import Runner, WorkerContext


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs inside each Ray Train worker: build model + engine, run the loop, report to Ray."""

    import ray.train
    from ray.train import Checkpoint


    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    spec = spec_from_dict(config["spec"])
    queue = config.get("queue")
    ctx_ray = ray.train.get_context()
    rank, world = ctx_ray.get_world_rank(), ctx_ray.get_world_size()
    device_kind = config["device"]
    if device_kind == "cuda":
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device(device_kind)

    def emit(kind: str, payload: dict[str, Any]) -> None:
        if queue is not None and rank == 0:
            try:
                queue.put_nowait((kind, payload))
            except Exception:  # a full or gone queue must never stop training
                pass

    torch.manual_seed(spec.train.seed)
    data = load_prepared(Path(config["data_dir"]))
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size, **special_ids(data.tokenizer))
    if rank == 0:
        emit("log", {"message": f"model: {spec.model.family}, {model.num_parameters():,} parameters"})
    engine = build_engine(model, spec, device)
    if rank == 0:
        if spec.scaling.deepspeed and engine.backend == "torch":
            emit("log", {"message": f"DeepSpeed has no {device.type} accelerator: running plain PyTorch"})
        else:
            emit("log", {"message": f"engine: {engine.backend} (ZeRO-{spec.scaling.zero_stage}) on {device}, {world} worker(s)"})
    logger = TensorBoardLogger(Path(config["tb_dir"])) if (rank == 0 and spec.output.tensorboard) else NullLogger()

    resume = ray.train.get_checkpoint()
    nodes = worker_nodes(world, device)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        ckpt = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        # worker_nodes lands in each sweep trial's result.json: where the trial's workers ran
        ray.train.report({**metrics, "worker_nodes": nodes}, checkpoint=ckpt)

    runner = Runner(spec, data, engine, WorkerContext(rank, world, device), logger=logger, report=report, emit=emit)
    if resume is not None:
        with resume.as_directory() as d:
            runner.load(Path(d))
        emit("log", {"message": f"resumed from step {runner.step}"})
    summary = runner.run()
    summary["worker_nodes"] = nodes  # summary.json: which Ray node each rank ran on
    emit("done", summary)
    return summary


def worker_nodes(world: int, device: torch.device) -> list[str]:
    """The Ray node id of every rank, in rank order (the same list on every rank).

    Recorded in summary.json and in each report, so a run on a cluster shows where it ran
    (``difflm cluster status`` shows the same ids).
    """
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return [node]
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, node)
    return [str(n) for n in gathered]
