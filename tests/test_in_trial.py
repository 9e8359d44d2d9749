"""A one-worker sweep trial trained in its own Tune actor (orchestrator.sweep.in_trial), driven in-process:
checkpoints land in the run folder as Ray Train would leave them, retention keeps the most recent ones,
and a trial that crashes mid-way and is started again (what Tune's failure policy does) ends with the
same weights as one that never crashed. The comparison with a real Ray Train run is in
tests/test_sweep_e2e.py (slow)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from difflm.data import prepare_data
from orchestrator.spec.run import RunSpec
from orchestrator.sweep.driver import trains_in_trial, trial_resources
from orchestrator.sweep.in_trial import PARTIAL_PREFIX, TrialHost, run_in_trial
from orchestrator.sweep.spec import load_sweep_file
from orchestrator.train.trainer import loop_config

SPEC: dict[str, Any] = {
    "model": {"family": "mdlm", "size": None, "d_model": 32, "n_layers": 1, "n_heads": 2, "cond_dim": 16},
    "diffusion": {"sample_steps": 2},
    "data": {"source": "builtin", "seq_len": 32, "max_documents": 200},
    "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 4,
              "checkpoint_every": 4, "log_every": 2, "num_samples": 0, "eval_samples": 2, "eval_at_start": False,
              "keep_checkpoints": 2},
    "scaling": {"num_workers": 1, "device": "cpu", "cpus_per_worker": 1, "deepspeed": False},
}


class Crash(RuntimeError):
    pass


def _config(tmp: Path, name: str, spec: RunSpec) -> dict[str, Any]:
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _m: None)
    run = tmp / name
    return loop_config(spec, "cpu", data.cache_dir, run / "train", run / "tensorboard", None, None)


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunSpec:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # run_worker sets its thread env in this process
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    raw = {**SPEC, "data": {**SPEC["data"], "cache_dir": str(tmp_path / "cache")}, "output": {"dir": str(tmp_path)}}
    return RunSpec.model_validate(raw)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str((run_dir / "checkpoints" / "last").resolve() / "model.safetensors"))


def test_crashed_trial_restarts_from_its_checkpoint_and_ends_with_the_same_weights(tmp_path: Path, spec: RunSpec) -> None:
    clean: list[dict[str, Any]] = []
    run_in_trial(_config(tmp_path, "clean", spec), clean.append)

    crashed: list[dict[str, Any]] = []

    def crash_after_step_8(metrics: dict[str, Any]) -> None:
        crashed.append(metrics)
        if metrics["step"] == 8 and len(crashed) == 2:
            raise Crash("the trial dies right after its step-8 checkpoint")

    config = _config(tmp_path, "crash", spec)
    with pytest.raises(Crash):
        run_in_trial(config, crash_after_step_8)
    run_dir = Path(config["run_dir"])
    assert sorted(d.name for d in run_dir.glob("checkpoint_*")) == ["checkpoint_00000004", "checkpoint_00000008"]
    run_in_trial(config, crashed.append)  # Tune's restart: the same function, the same config
    assert [m["step"] for m in crashed] == [4.0, 8.0, 12.0]  # continued at step 8, not from 0
    a, b = _weights(tmp_path / "clean" / "train"), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert crashed[-1]["val/nll"] == clean[-1]["val/nll"]
    # retention: the 2 most recent; every result with a checkpoint names it, as TuneReportCallback does
    assert sorted(d.name for d in run_dir.glob("checkpoint_*")) == ["checkpoint_00000008", "checkpoint_00000012"]
    assert crashed[-1]["checkpoint_path"] == str(run_dir / "checkpoint_00000012")
    assert (run_dir / "checkpoints" / "best").resolve().is_dir()
    assert clean[-1]["worker_nodes"] == ["local"] and "startup/first_step_s" not in clean[-1]  # no started_at given


def test_a_copy_cut_short_is_never_resumed_from(tmp_path: Path) -> None:
    run_dir = tmp_path / "train"
    (run_dir / f"{PARTIAL_PREFIX}checkpoint_00000008").mkdir(parents=True)
    host = TrialHost(run_dir, keep=1, report_fn=lambda m: None)
    assert not list(run_dir.glob(f"{PARTIAL_PREFIX}*"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    for step in (4, 8):
        host.report({"step": float(step)}, src, f"checkpoint_{step:08d}")
    assert [d.name for d in run_dir.iterdir()] == ["checkpoint_00000008"]  # keep=1


SWEEP = """
model: {family: mdlm, size: null, d_model: 32, n_layers: 1, n_heads: 2, cond_dim: 16}
data: {source: builtin, seq_len: 32}
scaling: {num_workers: %(workers)d, device: cpu, cpus_per_worker: 1}
sweep:
  search: {%(path)s: {grid: %(grid)s}}
  resources: {trial_cpus: %(share)s%(extra)s}
"""


@pytest.mark.parametrize(
    ("workers", "path", "grid", "extra", "expected"),
    [
        (1, "train.lr", "[0.001, 0.002]", "", True),
        (2, "train.lr", "[0.001, 0.002]", "", False),  # two workers need a Ray Train worker group
        (1, "scaling.num_workers", "[1, 2]", "", False),  # a trial may get more than one
        (1, "train.lr", "[0.001, 0.002]", ", in_trial: false", False),
    ],
)
def test_which_trials_train_in_their_actor(
    tmp_path: Path, workers: int, path: str, grid: str, extra: str, expected: bool
) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(SWEEP % {"workers": workers, "path": path, "grid": grid, "share": 0.25, "extra": extra})
    sweep = load_sweep_file(str(f))
    assert trains_in_trial(sweep) is expected
    if expected:  # the actor holds the worker's CPU (the trial's share carved out of it and added back)
        assert trial_resources(sweep, "cpu", True) == {"CPU": pytest.approx(1.0)}
    else:
        assert trial_resources(sweep, "cpu", False) == {"CPU": 0.25}

