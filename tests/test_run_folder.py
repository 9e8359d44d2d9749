"""Explicit resume, checked on the driver before Ray starts: a reused run folder, a resume with nothing to
resume, a resumed spec that changed. All exit 2 with one line; none starts Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.rundir.run_folder import check_run_folder
from orchestrator.spec.run import RunSpec
from orchestrator.spec.yamlio import spec_yaml
from tests.helpers import make_run_dir

RAW = {
    "model": {"family": "mdlm", "size": None, "d_model": 32, "n_layers": 1, "n_heads": 2, "cond_dim": 16},
    "diffusion": {"sample_steps": 2},
    "data": {"source": "builtin", "seq_len": 32, "max_documents": 60},
    "train": {"max_steps": 30, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 10,
              "checkpoint_every": 10, "num_samples": 0},
    "scaling": {"deepspeed": False, "device": "cpu"},
}


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    """A finished-looking run folder (checkpoint at step 2 + spec.yaml) and the spec file it came from."""
    raw = {**RAW, "data": {**RAW["data"], "cache_dir": str(tmp_path / "cache")}}
    run_dir = make_run_dir(tmp_path / "runs", "q", raw, steps=2)
    spec = RunSpec.model_validate({**raw, "output": {"dir": str(tmp_path / "runs"), "name": "q"}})
    (run_dir / "spec.yaml").write_text(spec_yaml(spec))
    spec_file = tmp_path / "q.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    return run_dir, spec_file


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def test_fresh_train_into_an_existing_run_exits_2_naming_both_ways_out(run: tuple[Path, Path]) -> None:
    run_dir, spec_file = run
    before = (run_dir / "spec.yaml").read_text()
    code, out = _cli("train", str(spec_file), "--output", str(run_dir.parent), "--name", "q", "--set", "train.lr=1e-4")
    assert code == 2, out
    assert f"{run_dir} already holds a run (checkpointed at step 2 of 30)" in out
    assert f"`difflm resume {run_dir}`" in out and "--name NEW_NAME" in out
    assert "Traceback" not in out
    assert (run_dir / "spec.yaml").read_text() == before  # the saved spec was not overwritten


def test_resume_refuses_a_changed_spec_unless_told(run: tuple[Path, Path]) -> None:
    run_dir, spec_file = run
    for args in (
        ("train", str(spec_file), "--output", str(run_dir.parent), "--name", "q", "--resume", "--set", "train.lr=1e-4"),
        ("resume", str(run_dir), "--set", "train.lr=1e-4", "--set", "diffusion.schedule=cosine"),
    ):
        code, out = _cli(*args)
        assert code == 2, out
        assert "train.lr: 0.003 -> 0.0001" in out and "--allow-spec-change" in out
    assert "diffusion.schedule: 'loglinear' -> 'cosine'" in out
    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    longer = RunSpec.model_validate({**saved, "train": {**saved["train"], "max_steps": 60, "eval_every": 5,
                                                         "checkpoint_every": 20}})
    check_run_folder(run_dir, longer.model_dump(mode="json"), resume=True, allow_spec_change=False)  # budget/cadence: fine
    changed = RunSpec.model_validate({**saved, "train": {**saved["train"], "lr": 1e-4}})
    check_run_folder(run_dir, changed.model_dump(mode="json"), resume=True, allow_spec_change=True)  # told: fine


def test_resuming_a_finished_run_says_how_to_train_longer(run: tuple[Path, Path]) -> None:
    run_dir, _ = run
    code, out = _cli("resume", str(run_dir), "--set", "train.max_steps=2")
    assert code == 2, out
    assert f"{run_dir} is checkpointed at step 2 and train.max_steps is 2: nothing to train" in out
    assert f"`difflm resume {run_dir} --set train.max_steps=N` with N > 2" in out


def test_resume_needs_a_run_or_sweep_folder(run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, spec_file = run
    code, out = _cli("resume", str(tmp_path / "nothing"))
    assert code == 2 and "neither a run folder" in out
    code, out = _cli("train", str(spec_file), "--output", str(run_dir.parent), "--name", "fresh", "--resume")
    assert code == 2 and "nothing to resume" in out and "holds no run" in out
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    (sweep_dir / "difflm_sweep.json").write_text('{"spec_path": "x.yaml", "overrides": []}')
    code, out = _cli("resume", str(sweep_dir), "--set", "train.lr=1")
    assert code == 2 and "is a sweep: --set applies to runs only" in out
    with pytest.raises(SpecError, match="already holds a run"):
        check_run_folder(run_dir, {}, resume=False, allow_spec_change=False)
