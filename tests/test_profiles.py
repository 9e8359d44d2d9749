"""Scaling profiles (orchestrator/cluster/profile.py): validation, lookup, and precedence under a spec.

Precedence, later wins: RunSpec defaults < profile < spec file < --set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.cluster.profile import Profile, load_profile, profile_names
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec, load_run_spec
from orchestrator.sweep.spec import load_sweep_file

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_profiles() -> None:
    assert profile_names() == ["cpu", "laptop-mps", "workstation-6gpu"]
    ws, path = load_profile("workstation-6gpu")
    assert path == REPO / "clusters" / "workstation-6gpu.yaml"
    # the seed journals' box: 6 GPUs x 4 sequences = 24 per step, bf16, ZeRO-2
    assert ws.defaults() == {
        "scaling": {"device": "cuda", "num_workers": 6, "gpus_per_worker": 1.0, "cpus_per_worker": 2.0,
                    "zero_stage": 2, "deepspeed": True},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "precision": "bf16"},
    }
    mps, _ = load_profile("laptop-mps")
    assert mps.defaults()["scaling"] == {"device": "mps", "num_workers": 1, "cpus_per_worker": 1.0,
                                         "deepspeed": False, "zero_stage": 0}
    assert load_profile("cpu")[0].defaults()["scaling"]["device"] == "cpu"


def test_precedence_defaults_profile_spec_set(tmp_path: Path) -> None:
    ws = load_profile("workstation-6gpu")[0].defaults()
    spec = _write(tmp_path, "s.yaml", "scaling:\n  num_workers: 2\ntrain:\n  max_steps: 10\n")
    s = load_run_spec(spec, [], defaults=ws)
    assert s.scaling.num_workers == 2  # the spec file wins over the profile
    assert s.scaling.zero_stage == 2 and s.scaling.device == "cuda"  # the profile fills what the spec leaves
    assert s.train.precision == "bf16" and s.train.micro_batch_size == 4 and s.train.max_steps == 10
    assert RunSpec().train.micro_batch_size == 16  # ... over RunSpec's own default
    s = load_run_spec(spec, ["scaling.num_workers=3", "train.precision=fp32"], defaults=ws)
    assert s.scaling.num_workers == 3 and s.train.precision == "fp32"  # --set wins over both
    assert load_run_spec(spec, []).scaling.num_workers == 2 and load_run_spec(spec, []).scaling.zero_stage == 0


def test_profile_under_a_sweep_file(tmp_path: Path) -> None:
    sweep = _write(
        tmp_path, "sw.yaml",
        "scaling: {device: cpu}\nsweep:\n  search:\n    train.lr: {grid: [0.001, 0.002]}\n"
        "  resources: {workers_per_trial: 3}\n",
    )
    sw = load_sweep_file(str(sweep), [], defaults=load_profile("workstation-6gpu")[0].defaults())
    base = sw.base_raw()
    assert base["scaling"]["device"] == "cpu"  # the file wins
    assert base["scaling"]["num_workers"] == 3  # sweep.resources win over the profile's 6
    assert base["train"]["precision"] == "bf16" and base["scaling"]["zero_stage"] == 2


@pytest.mark.parametrize(
    "text,expected",
    [
        ("scaling: {num_workers: 2}\n", r"description: Field required"),
        ("description: x\ntrain: {lr: 0.1}\n", r"train\.lr: a profile sets how a run scales, not what it trains"),
        ("description: x\nmodel: {size: base}\n", r"unknown key 'model'"),
        ("description: x\ndata: {seq_len: 64}\n", r"data\.seq_len: a profile sets how a run scales"),
        ("description: x\nscaling: {zero_stage: 5}\n", r"scaling\.zero_stage: Input should be less than or equal to 3"),
        ("description: x\nscaling: {device: mps}\ntrain: {precision: fp16}\n", r"fp16 needs CUDA"),
    ],
)
def test_bad_profiles(tmp_path: Path, text: str, expected: str) -> None:
    p = _write(tmp_path, "p.yaml", text)
    with pytest.raises(SpecError, match=expected):
        load_profile(str(p))


def test_profile_lookup_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such profile; choose one of cpu, laptop-mps, workstation-6gpu"):
        load_profile("workstation")
    with pytest.raises(SpecError, match="is a Ray cluster-launcher config, not a difflm profile"):
        load_profile("local")
    with pytest.raises(SpecError, match="file not found"):
        load_profile(str(tmp_path / "missing.yaml"))


def test_only_set_fields_are_applied() -> None:
    p = Profile.model_validate({"description": "x", "scaling": {"zero_stage": 1}})
    assert p.defaults() == {"scaling": {"zero_stage": 1}}


def test_cli_applies_the_profile_before_ray(tmp_path: Path) -> None:
    """`difflm train --profile` puts the profile under the spec; what it asks for is checked before Ray starts."""
    import torch

    spec = _write(tmp_path, "s.yaml", "train: {max_steps: 5}\n")
    runner = CliRunner()
    if not torch.cuda.is_available():
        res = runner.invoke(main, ["train", str(spec), "--profile", "workstation-6gpu"])
        assert res.exit_code == 2, res.output
        # the profile's 6 workers x 2 CPUs (on a small box) or its cuda device
        assert "6 workers x 2 CPUs = 12 CPUs" in res.output or "device is cuda but" in res.output, res.output
        assert "profile " in res.output and "scaling.num_workers=6" in res.output
    if not torch.backends.mps.is_available():
        res = runner.invoke(main, ["train", str(spec), "--profile", "laptop-mps"])
        assert res.exit_code == 2 and "scaling.device is mps but this machine has no Apple MPS device" in res.output
    res = runner.invoke(main, ["train", str(spec), "--profile", "cpu", "--set", "scaling.num_workers=512"])
    assert res.exit_code == 2 and "512 workers x 1 CPUs = 512 CPUs" in res.output, res.output
    res = runner.invoke(main, ["sweep", str(spec), "--profile", "nope"])
    assert res.exit_code == 2 and "--profile nope: no such profile" in res.output
    res = runner.invoke(main, ["validate", "--profile", "workstation-6gpu", str(spec)])
    assert res.exit_code == 0 and "ok:" in res.output
