"""A one-worker sweep trial trained inside its Tune trial actor, without a Ray Train run.

Why: a Ray Train run starts two more Python processes per trial (the V2 controller and the worker),
each importing Ray and torch before the first step: 14-17 s of a quickstart trial on 2 cores, more
than its 60 steps of training. A trial of one worker needs neither: its Tune actor already is a
Ray worker process holding the trial's resources, so it runs the same training function
(:func:`orchestrator.train.worker.run_worker`) itself. Ray Train's local mode
(``ScalingConfig(num_workers=0)``) would also run it in-process, but it keeps no checkpoint, calls
no callback and has no failure policy, so it cannot carry the trial's guarantees.

What Ray Train did for such a trial, and who does it here:

* checkpoints: :class:`TrialHost` moves each one into ``RUN_DIR/checkpoint_<step>`` (copied under a
  hidden name, then renamed: a folder with the final name is always complete) and keeps the
  ``train.keep_checkpoints`` most recent; the worker function links ``checkpoints/best|last`` as it
  does under Ray Train;
* results: ``tune.report`` with the same metrics rank 0 gave Ray Train (plus ``checkpoint_path``,
  as ``TuneReportCallback`` adds), so the console, ASHA's rungs and ``difflm results`` see no difference;
* failures: an exception or a dead actor fails the trial, and Tune restarts it
  (``sweep.max_failures``); the restarted function resumes from the newest checkpoint of its run
  folder that verifies (the run folder is named from the trial id, as before);
* the process group DeepSpeed needs: a world of one on a free local port.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from orchestrator.rundir.ckpt_files import checkpoint_dirs

#: Prefix of a checkpoint folder still being copied into the run folder (never resumed from).
PARTIAL_PREFIX = ".partial-"


class TrialHost:
    """The :class:`orchestrator.train.worker.WorkerHost` of a trial trained in its own actor (rank 0 of 1).

    ``report_fn`` receives every result (``ray.tune.report`` in a trial; tests pass a list's append)."""

    rank = 0
    world = 1

    def __init__(self, run_dir: Path, keep: int, report_fn: Any) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.report_fn = report_fn
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for partial in self.run_dir.glob(f"{PARTIAL_PREFIX}*"):  # a copy cut short by a crash
            shutil.rmtree(partial, ignore_errors=True)

    def device(self, kind: str) -> torch.device:
        if kind == "cuda":  # Ray sets CUDA_VISIBLE_DEVICES of the actor to the GPU(s) it reserved
            torch.cuda.set_device(0)
            return torch.device("cuda", 0)
        return torch.device(kind)

    def preferred_checkpoint(self) -> Path | None:
        return None  # the run folder is the registry: pick_resume_checkpoint takes its newest good one

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None) -> None:
        if checkpoint_dir is not None and name is not None:
            target = self.run_dir / name
            partial = self.run_dir / f"{PARTIAL_PREFIX}{name}"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(checkpoint_dir, partial)
            os.replace(partial, target)
            self._retain(target)
            metrics = {**metrics, "checkpoint_path": str(target)}
        self.report_fn(metrics)

    def _retain(self, newest: Path) -> None:
        """Keep the ``keep`` most recent checkpoints (by step); the best lives on as a hard-linked copy
        under ``checkpoints/`` (orchestrator.rundir.ckpt_files.update_links)."""
        for old in [d for d in checkpoint_dirs(self.run_dir) if d != newest][max(self.keep - 1, 0):]:
            shutil.rmtree(old, ignore_errors=True)


def run_in_trial(config: dict[str, Any], report_fn: Any) -> dict[str, Any]:
    """Train one trial in this process: ``config`` as for a Ray Train worker
    (``orchestrator.train.trainer.loop_config``); results go to ``report_fn``."""
    from orchestrator.spec.run import spec_from_dict
    from orchestrator.train.engine import init_single_rank_group
    from orchestrator.train.worker import run_worker

    spec = spec_from_dict(config["spec"])
    host = TrialHost(Path(config["run_dir"]), spec.train.keep_checkpoints, report_fn)
    if spec.scaling.deepspeed and config["device"] != "mps":
        init_single_rank_group(torch.device(config["device"]))
    return run_worker(config, host)
