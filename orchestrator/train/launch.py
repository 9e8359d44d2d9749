"""`difflm train` as a Ray Train job: resource checks, ``TorchTrainer`` launch and the per-worker function.

Flow: the driver validates the spec, tokenizes (cached) so errors surface before
Ray starts, checks resources, starts/joins Ray, then runs ``TorchTrainer`` with
:func:`train_fn_per_worker` on ``scaling.num_workers`` workers. Each worker builds
the family, wraps it in DeepSpeed (plain torch on MPS) and hands the loop to
:class:`orchestrator.train.runner.Runner`. Rank 0 writes TensorBoard and sends progress
events through a Ray queue to the driver's console.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflm.data import prepare_data
from orchestrator.cluster.connect import alive_nodes, check_shared_storage, start_or_join
from orchestrator.train.console import TrainConsole
from orchestrator.devices import resolve_device
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec
from orchestrator.train.worker import train_fn_per_worker
from orchestrator.spec.yamlio import spec_yaml

# The Train controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), which throttles ray.train.report; we report only at eval points, and
# a shorter interval keeps short runs and ASHA decisions snappy.
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    # Tune's own progress box and tables: `difflm sweep` draws its own.
    "RAY_AIR_NEW_OUTPUT": "0",
}


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


def init_ray(address: str | None) -> None:
    """Start (or join) Ray quietly; dashboard on localhost (Tune needs its state API to free stopped trials)."""
    import ray

    if ray.is_initialized():
        return
    env = dict(RAY_ENV)
    os.environ.update(env)
    kwargs: dict[str, Any] = dict(
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": env},
        include_dashboard=address is None,
    )
    if address is None:
        kwargs["dashboard_host"] = "127.0.0.1"
    # a private instance that dies with this driver, or the cluster with the project code shipped
    start_or_join(address, ray.init, kwargs)
    _quiet_worker_startup_warning()
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_worker_startup_warning() -> None:
    """Drop the raylet's "N worker processes have been started" warning from the console.

    Tune trials hold a 0.01-CPU actor each (see sweep.py), which the raylet reads as
    "too many workers for the CPU count" and announces on every sweep; it is expected
    here and hides the sweep table. Every other raylet message still prints.
    """
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_difflm_filtered", False):
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and any("worker processes have been started" in ln for ln in data.get("lines", [])):
            return
        original(data, ignore_prefix)

    filtered._difflm_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


def _link(target: Path | None, link: Path) -> None:
    if target is None:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def prepare_and_place(spec: RunSpec, address: str | None, console: TrainConsole) -> tuple[Any, str, float, float]:
    """Driver set-up shared by train and sweep: check resources, tokenize (cached), start or join Ray.

    Returns (prepared data, device, CPUs, GPUs). Order keeps user errors before Ray: this machine
    is checked before tokenizing; a cluster is checked right after joining it (resources, and
    paths every node must see), before tokenizing. Tokenizing on the driver makes data errors
    surface before a private Ray starts; workers read the cache.
    """
    if address is None:
        cpus, gpus = local_resources()
        device = resolve_device(spec.scaling.device)
        check_resources(spec, device, cpus, gpus, "this machine")
    else:  # joining is cheap: check the cluster (resources, shared paths) before tokenizing
        import ray

        init_ray(address)
        res = ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        device = resolve_device(spec.scaling.device, gpus)
        check_resources(spec, device, cpus, gpus, f"the cluster at {address}")
        check_shared_storage({"output.dir": spec.output.dir, "data.cache_dir": spec.data.cache_dir}, len(alive_nodes()))
    prepared = prepare_data(spec.data, spec.tokenizer, log=console.info)
    init_ray(address)
    return prepared, device, cpus, gpus


def launch_train(spec: RunSpec, *, address: str | None = None, console: TrainConsole | None = None) -> TrainResult:
    """Prepare data, check resources, run the TorchTrainer, link best/last checkpoints, return the result."""
    console = console or TrainConsole()
    name = spec.run_name()
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"name": name})})
    storage = Path(spec.output.dir).expanduser().resolve()
    run_dir = storage / name

    prepared, device, _, _ = prepare_and_place(spec, address, console)
    console.info(
        f"data: {len(prepared.train):,} train / {len(prepared.val):,} val blocks of {spec.data.seq_len} tokens, "
        f"vocab {prepared.tokenizer.vocab_size:,}"
    )

    s, t = spec.scaling, spec.train
    global_batch = t.micro_batch_size * t.grad_accum * s.num_workers
    console.info(
        f"run: {run_dir}\nbatch: {t.micro_batch_size} micro x {s.num_workers} workers x {t.grad_accum} accum = "
        f"{global_batch} sequences ({global_batch * spec.data.seq_len:,} tokens) per step, {t.max_steps} steps"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(spec_yaml(spec))
    tb_dir = run_dir / "tensorboard"
    result = _fit(spec, device, prepared.cache_dir, run_dir, tb_dir, console)
    return result


def build_trainer(
    spec: RunSpec, device: str, data_dir: Path, run_dir: Path, tb_dir: Path, queue: Any, callbacks: list[Any] | None = None
) -> Any:
    """The TorchTrainer for one run; Ray stores its checkpoints under ``run_dir`` (also used by each Tune trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = spec.scaling
    use_gpu = device == "cuda"
    resources = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "device": device,
            "data_dir": str(data_dir),
            "tb_dir": str(tb_dir),
            "queue": queue,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            callbacks=callbacks or [],
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val/nll", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=0),
        ),
    )


def link_checkpoints(result: Any, run_dir: Path) -> tuple[Path | None, Path | None]:
    """Point RUN_DIR/checkpoints/{best,last} at Ray's checkpoint folders; return (best, last)."""
    last = Path(result.checkpoint.path) if result.checkpoint else None
    best = None
    if result.best_checkpoints:
        best_ckpt, _ = min(result.best_checkpoints, key=lambda cm: cm[1].get("val/nll", float("inf")))
        best = Path(best_ckpt.path)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    _link(best, ckpt_dir / "best")
    _link(last, ckpt_dir / "last")
    return best, last


def _fit(spec: RunSpec, device: str, data_dir: Path, run_dir: Path, tb_dir: Path, console: TrainConsole) -> TrainResult:
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(spec, device, data_dir, run_dir, tb_dir, queue)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the main thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="difflm-fit", daemon=True)
    thread.start()
    summary: dict[str, Any] = {}
    try:
        while thread.is_alive() or not queue.empty():
            try:
                kind, payload = queue.get(timeout=0.25)
            except Empty:
                continue
            if kind == "done":
                summary = payload
            else:
                console.handle(kind, payload)
    finally:
        console.close()
    thread.join()
    if "error" in box:
        raise box["error"]
    result = box["result"]
    if result.error is not None:
        raise result.error
    best, last = link_checkpoints(result, run_dir)
    summary = summary or dict(result.metrics or {})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return TrainResult(run_dir, summary, best, last, tb_dir)
