"""End to end through the real CLI: `difflm train` with 2 Ray workers on CPU, DeepSpeed ZeRO-2.

Each run starts a local Ray instance (~20 s) and trains a tiny model for 40 steps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.train.metrics import read_scalars, read_tags

pytestmark = pytest.mark.slow

SPEC = """
model:
  family: {family}
  size: null
  d_model: 64
  n_layers: 2
  n_heads: 4
  cond_dim: 32
{diffusion}data:
  source: builtin
  seq_len: 64
  max_documents: 400
  cache_dir: {cache}
train:
  max_steps: 40
  micro_batch_size: 8
  lr: 3.0e-3
  warmup_steps: 5
  eval_every: 20
  checkpoint_every: 40
  log_every: 5
  num_samples: 2
scaling:
  num_workers: 2
  device: cpu
  cpus_per_worker: 1
  zero_stage: 2
"""

TRAIN_TAGS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec"}
VAL_TAGS = {"val/nll", "val/nll_se", "val/ppl", "val/bpt"}


def _train(tmp_path: Path, family: str, *sets: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    spec = tmp_path / f"{family}.yaml"
    diffusion = "diffusion:\n  sample_steps: 16\n" if family != "ar" else ""  # ar reads no diffusion field
    spec.write_text(SPEC.format(family=family, cache=tmp_path / "cache", diffusion=diffusion))
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    overrides = [arg for kv in sets for arg in ("--set", kv)]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", str(spec), "--output", str(out), "--name", family, *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return proc, out / family


def test_train_two_workers_zero2(tmp_path: Path) -> None:
    """Ray Train's path (2 workers, ZeRO-2, sharded val gathered, eval reproducing it) is family-blind: one family
    here. Every family's run through the trainer and the CLI is the family contract's (tests/test_family_contract.py:
    ar's exact NLL with standard error 0 there too)."""
    family = "mdlm"
    proc, run_dir = _train(tmp_path, family)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "Traceback" not in log
    assert "engine: deepspeed (ZeRO-2) on cpu, 2 worker(s), 1 thread(s) each" in log
    assert "16 sequences" in log  # global batch = 8 micro x 2 workers x 1 accum
    assert "best val NLL" in log and f"difflm tensorboard {run_dir}" in log

    scalars = read_scalars(run_dir / "tensorboard")
    assert TRAIN_TAGS | VAL_TAGS <= set(scalars)
    assert "samples/text/text_summary" in read_tags(run_dir / "tensorboard")
    val = dict(scalars["val/nll"])
    assert sorted(val) == [0, 20, 40]
    assert val[40] < val[0] - 0.3, val  # learned something real in 40 steps
    # ppl is exp(nll) of the same float64 sums
    assert dict(scalars["val/ppl"])[40] == pytest.approx(2.718281828 ** val[40], rel=1e-4)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["best_val_nll"] == pytest.approx(min(val.values()), rel=1e-5)
    se = dict(scalars["val/nll_se"])
    assert summary["best_val_nll_se"] == pytest.approx(se[min(val, key=val.get)], rel=1e-5)
    assert (se[40] == 0.0) if family == "ar" else (0 < se[40] < 0.1), se  # ar's NLL is exact
    assert "± " in log  # console: val_nll ± SE at every eval, and in the summary
    # rank 0 saved the gathered per-sequence draws of both workers' shards at every eval point
    assert sorted(p.name for p in (run_dir / "val").iterdir()) == [f"step_{s:07d}.npz" for s in (0, 20, 40)]
    # `difflm eval` (one process, no shards) reproduces the 2-worker val/nll from the last checkpoint
    ev = subprocess.run([sys.executable, "-m", "orchestrator", "eval", str(run_dir / "last"), "--json"],
                        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert ev.returncode == 0, ev.stdout + ev.stderr
    assert "(reproduced, to float rounding)" in ev.stderr, ev.stderr
    assert json.loads(ev.stdout)["nll"] == pytest.approx(val[40], rel=1e-6)

    for name in ("best", "last"):
        ckpt = run_dir / "checkpoints" / name
        assert ckpt.is_dir(), name
        for f in ("model.safetensors", "spec.yaml", "trainer_state.json", "tokenizer"):
            assert (ckpt / f).exists(), f"{name}/{f}"
        # ZeRO-2 optimizer partitions from both ranks were merged into one checkpoint
        states = list((ckpt / "deepspeed").rglob("*optim_states.pt"))
        assert len(states) == 2, states
    state = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 40


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs for one 2-CPU worker")
def test_worker_threads_follow_cpus_per_worker_and_startup_is_reported(tmp_path: Path) -> None:
    """Ray's job env pins OMP_NUM_THREADS=1; a worker that reserved 2 CPUs must still compute on 2 threads.
    The run also reports where its start-up went, in milestone order."""
    proc, run_dir = _train(
        tmp_path, "mdlm", "scaling.num_workers=1", "scaling.cpus_per_worker=2", "train.max_steps=2",
        "train.eval_every=2", "train.checkpoint_every=2",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "engine: deepspeed (ZeRO-0) on cpu, 1 worker(s), 2 thread(s) each; ZeRO-2 partitions from 2 workers" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["threads"] == 2
    startup = summary["startup"]
    # one worker on this machine: no Ray to start (orchestrator.local.supervisor)
    assert list(startup) == ["spec", "data", "worker", "engine", "ready", "loop", "step1"]
    times = list(startup.values())
    assert all(0 < a <= b for a, b in zip(times, times[1:])), startup
    shown = re.search(r"first optimizer step ([0-9.]+) s after start \(CLI \+ spec", log)
    assert shown and float(shown.group(1)) == pytest.approx(startup["step1"], abs=0.051), log
    # the worker process started before the data was ready and imported beside the driver
    beside = summary["startup_worker_process"]
    assert 0 < beside["worker_started"] <= startup["data"] < startup["worker"], (beside, startup)
    assert beside["worker_started"] < beside["worker_imported"] < startup["engine"], (beside, startup)
    assert re.search(r"; worker process: started [0-9.]+ s, imports done [0-9.]+ s", log), log
