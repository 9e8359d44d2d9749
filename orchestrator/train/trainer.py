"""The Ray Train trainer of one run (or one sweep trial): ``TorchTrainer`` without the helpers difflm has no use for.

Ray Train V2 starts a handful of helper actors with every run, each a Python process that imports
Ray (1-2 CPU-seconds apiece; on a 2-core box they queue behind each other before the first step).
Two of them do nothing for difflm, so the trainer :func:`lean_trainer_class` defines leaves them out:

* ``DatasetsCallback`` starts a ``DatasetManager`` actor for Ray Data shards, also when the
  trainer has no datasets; difflm feeds workers from its own token cache and passes none. Its
  actor was on the critical path: the train function waited for it (~1.5-2 s, 2 cores).
* ``PlacementGroupCleanerCallback`` starts a detached actor that removes the run's placement
  group if the controller dies while the Ray instance lives on. It asks the state API (the
  dashboard) every second whether the controller is alive. A single ``difflm train`` on its
  private Ray has no dashboard, so the cleaner cannot work there: each query ran into its
  timeout, it burnt CPU beside the training worker, and stopping it blocked the end of every
  run for ~12 s. The private Ray dies with the driver, placement groups included. Sweeps
  (Tune may stop a trial's controller abruptly while the instance lives on) and clusters keep it.

Everything else (controller, worker group, checkpoints, failure handling) is Ray Train's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator import raycompat
from orchestrator.devices import worker_env
from orchestrator.spec.run import RunSpec
from orchestrator.train.startup import thread_env
from orchestrator.train.worker import train_fn_per_worker

#: Seconds a collective may wait before NCCL's watchdog aborts the group (Ray Train sets
#: TORCH_NCCL_ASYNC_ERROR_HANDLING=1, so the abort fails the workers and FailureConfig restarts them from the
#: latest checkpoint). Ray's own default, kept on purpose and named here: ranks legitimately wait at a barrier
#: while rank 0 writes a checkpoint or draws its samples, minutes at base size on a slow disk; a dead peer is
#: found sooner by Ray's health check, so only a hung-but-alive rank costs the full wait (docs/scaling.md).
COLLECTIVE_TIMEOUT_S = 1800

#: Per-sequence val draws of every eval point (rank 0): RUN_DIR/val/step_XXXXXXX.npz (difflm.evaluation).
VAL_DIR = "val"


def lean_trainer_class() -> type:
    """``LeanTorchTrainer`` (orchestrator.raycompat, which touches Ray Train's private callback API),
    defined on first use: importing this module (the doctor does) must not import Ray Train (2-3 s)."""
    return raycompat.lean_torch_trainer_class()


def loop_config(
    spec: RunSpec, device: str, data_dir: Path, run_dir: Path, tb_dir: Path, queue: Any, started_at: float | None
) -> dict[str, Any]:
    """What the training function of every rank reads (``orchestrator.train.worker.run_worker``), under
    Ray Train or in a sweep's trial actor alike."""
    return {
        "spec": spec.model_dump(mode="json"),
        "device": device,
        "data_dir": str(data_dir),
        "run_dir": str(run_dir),
        "tb_dir": str(tb_dir),
        "val_dir": str(run_dir / VAL_DIR),
        "queue": queue,
        "started_at": started_at,
    }


def build_trainer(
    spec: RunSpec,
    device: str,
    data_dir: Path,
    run_dir: Path,
    tb_dir: Path,
    queue: Any,
    callbacks: list[Any] | None = None,
    started_at: float | None = None,
    pg_cleaner: bool = True,
) -> Any:
    """The trainer for one run; Ray stores its checkpoints under ``run_dir`` (also used by each Tune trial).

    Workers get ``scaling.cpus_per_worker`` OpenMP/MKL threads through their runtime env (the job's
    env pins Ray's own processes to one). ``pg_cleaner=False``: a run on a private Ray without a
    dashboard (see the module docstring)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    s = spec.scaling
    use_gpu = device == "cuda"
    resources = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return lean_trainer_class()(
        train_fn_per_worker,
        pg_cleaner=pg_cleaner,
        train_loop_config=loop_config(spec, device, data_dir, run_dir, tb_dir, queue, started_at),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=COLLECTIVE_TIMEOUT_S),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            callbacks=callbacks or [],
            # The most recent train.keep_checkpoints (by report time); the best survives as a hard-linked
            # copy in RUN_DIR/checkpoints/best (ckpt_files.update_links), which Ray's score cannot express.
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.train.keep_checkpoints,
                checkpoint_score_attribute="checkpoint_time",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            worker_runtime_env={"env_vars": {**thread_env(s.cpus_per_worker), **worker_env(device)}},
        ),
    )
