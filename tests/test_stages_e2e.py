"""End to end through the real CLI: a staged ATAT spec runs all its stages in one `difflm train`
(Ray Train, one worker, DeepSpeed ZeRO-2 on CPU), with the stages, curriculum and importance in TensorBoard
and the stage in the last checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.rundir.checkpoints import load_checkpoint
from orchestrator.train.metrics import read_histograms, read_scalars

pytestmark = pytest.mark.slow

SPEC = """
model: {{family: mdlm, size: null, d_model: 32, n_layers: 2, n_heads: 2, cond_dim: 16}}
diffusion:
  sample_steps: 4
  atat: {{head_width: 16, head_layers: 1, head_heads: 2, curriculum_bounds: [0.3, 0.6]}}
data: {{source: builtin, seq_len: 32, max_documents: 200, cache_dir: {cache}}}
train: {{micro_batch_size: 4, lr: 2.0e-3, warmup_steps: 1, eval_every: 100, checkpoint_every: 100,
         log_every: 1, num_samples: 1}}
scaling: {{num_workers: 1, device: cpu, cpus_per_worker: 1, zero_stage: 2}}
stages:
  - {{name: plain, steps: 4}}
  - {{name: importance, steps: 4, set: {{diffusion.atat.importance_head: true}}}}
  - name: adaptive
    steps: 6
    set: {{diffusion.atat.adaptive_masking: true, diffusion.atat.curriculum: true, train.lr_schedule: phases}}
"""


def test_staged_spec_runs_every_stage_in_one_command(tmp_path: Path) -> None:
    spec = tmp_path / "staged.yaml"
    spec.write_text(SPEC.format(cache=tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", str(spec), "--output", str(tmp_path / "runs"), "--name", "st"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "Traceback" not in log
    for line in ("stage 0 (plain): steps 0-4", "stage 1 (importance): steps 4-8", "stage 2 (adaptive): steps 8-14"):
        assert line in log, log
    run_dir = tmp_path / "runs" / "st"

    scalars = read_scalars(run_dir / "tensorboard")
    stage = dict(scalars["train/stage"])
    assert [stage[s] for s in range(1, 15)] == [0] * 4 + [1] * 4 + [2] * 6
    phase = dict(scalars["train/curriculum_phase"])
    assert [phase[s] for s in range(9, 15)] == [0, 0, 1, 1, 2, 2]  # 6 steps, bounds 0.3 / 0.6 of them
    assert sorted(dict(scalars["train/importance_loss"])) == list(range(5, 15))
    assert read_histograms(run_dir / "tensorboard")["train/importance"] == list(range(5, 15))
    assert sorted(dict(scalars["val/nll"])) == [0, 4, 8, 14]  # a val point at the end of every stage

    state = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 14 and state["stage"]["name"] == "adaptive"
    loaded = load_checkpoint(run_dir / "checkpoints" / "last", device="cpu")  # built with the head any stage used
    assert loaded.model.importance is not None  # type: ignore[attr-defined]
