"""Sweep files: validation before Ray starts (paths, values, algorithm limits) and trial spec assembly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.sweep.results import expected_trials
from orchestrator.spec.run import RunSpec
from orchestrator.sweep.driver import fit_count
from orchestrator.sweep.spec import trial_dirname
from orchestrator.sweep.spec import load_sweep_file, trial_raw

BASE = """
model: {family: mdlm, size: tiny}
train: {max_steps: 40, eval_every: 10, checkpoint_every: 10}
scaling: {num_workers: 1, device: cpu}
output: {dir: %s}
sweep:
%s
"""


def _file(tmp_path: Path, sweep_block: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(BASE % (tmp_path / "runs", sweep_block))
    return p


@pytest.mark.parametrize(
    "block,expected",
    [
        ("  search:\n    diffusion.schedul: {grid: [loglinear]}",
         r"'diffusion\.schedul' is not a run-spec field; did you mean 'diffusion\.schedule'\?"),
        ("  search:\n    diffusion.schedule: {grid: [loglinear, cosinus]}",
         r"sweep\.search\.diffusion\.schedule='cosinus'.*choose one of loglinear"),
        ("  search:\n    train.lr: {loguniform: [0.0, 0.1]}", r"low must be > 0 for a log scale"),
        ("  search:\n    train.lr: {uniform: [0.1, 0.01]}", r"low \(0\.1\) must be below high \(0\.01\)"),
        ("  search:\n    diffusion.likelihood_weight: {uniform: [0.5, 2.0]}",
         r"likelihood_weight=2\.0.*less than or equal to 1"),
        ("  search:\n    diffusion.schedule: {grid: [cosine]}\n  algorithm: optuna",
         r"optuna cannot search grid domains \(diffusion\.schedule\); use choice"),
        ("  search:\n    train.lr: {grid: [0.1], choice: [0.2]}", r"give exactly one of grid, choice"),
        ("  search:\n    variant: {grid: [a, b]}\n  linked:\n    variant:\n      a: {model.size: small}",
         r"label 'variant' needs grid/choice values that each have an entry in sweep\.linked\.variant \(missing: b\)"),
        ("  search:\n    train.lr: {choice: [0.1]}\n  scheduler: {grace_period: 100}", r"grace_period \(100\) exceeds"),
        ("  serch:\n    train.lr: {choice: [0.1]}", r"unknown key 'serch'; did you mean 'search'\?"),
    ],
)
def test_bad_sweeps_exit_2_before_ray(tmp_path: Path, block: str, expected: str) -> None:
    p = _file(tmp_path, block)
    for cmd in (["sweep", str(p)], ["validate", str(p)]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 2, res.output
        assert re.search(expected, res.output), res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_run_spec_given_to_sweep_and_missing_resume(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("model: {family: ar}\n")
    res = CliRunner().invoke(main, ["sweep", str(run)])
    assert res.exit_code == 2 and "no `sweep:` section" in res.output
    p = _file(tmp_path, "  search:\n    train.lr: {choice: [0.1, 0.01]}")
    res = CliRunner().invoke(main, ["sweep", str(p), "--resume"])
    assert res.exit_code == 2 and "nothing to resume" in res.output
    res = CliRunner().invoke(main, ["resume", str(tmp_path)])
    assert res.exit_code == 2 and "neither a run folder" in res.output and "nor a sweep folder" in res.output


def test_trial_spec_assembly_linked_and_labels(tmp_path: Path) -> None:
    p = _file(
        tmp_path,
        "  search:\n    model.size: {grid: [tiny, small]}\n    fam: {choice: [m, a]}\n"
        "  linked:\n    model.size:\n      small: {scaling.num_workers: 2}\n"
        "    fam:\n      m: {model.family: mdlm}\n      a: {model.family: ar}\n"
        "  budget: {max_steps: 30}\n  resources: {trial_cpus: 0.02}",
    )
    sweep = load_sweep_file(str(p))
    base = sweep.base_raw()
    assert base["train"]["max_steps"] == 30  # budget overrides train.max_steps
    assert base["scaling"]["cpus_per_worker"] == pytest.approx(0.98)  # trial actor's share carved out
    raw = trial_raw(base, {"model.size": "small", "fam": "a"}, sweep.sweep.linked)
    spec = RunSpec.model_validate(raw)
    assert (spec.model.size, spec.model.family, spec.scaling.num_workers) == ("small", "ar", 2)
    assert "fam" not in raw
    assert expected_trials(sweep.model_dump(mode="json")) == 2
    # 1 worker x (0.98 + 0.02) CPU per trial: 2 trials on 2 CPUs, 5 on 5
    assert fit_count(sweep, "cpu", 2.0, 0.0) == 2 and fit_count(sweep, "cpu", 5.0, 0.0) == 5


def test_trial_dirnames_deterministic_and_readable() -> None:
    a = trial_dirname("abc_00001", {"diffusion.schedule": "cosine", "train.lr": 0.0012345})
    assert a == trial_dirname("abc_00001", {"train.lr": 0.0012345, "diffusion.schedule": "cosine"})
    assert a == "abc_00001-schedule=cosine-lr=0.001234" or a == "abc_00001-schedule=cosine-lr=0.001235"


def test_shipped_sweeps_cover_their_questions() -> None:
    root = Path(__file__).resolve().parents[1] / "sweeps"
    ns = load_sweep_file(str(root / "noise_schedules.yaml"))
    pairs = {(v["model.family"], v["diffusion.schedule"]) for v in ns.sweep.linked["schedule"].values()}
    assert {("mdlm", s) for s in ("loglinear", "linear", "cosine", "cosinesqr", "geometric", "sqrt")} <= pairs
    assert {("diffusion_lm", s) for s in ("sqrt", "cosine", "linear")} <= pairs
    lw = load_sweep_file(str(root / "likelihood_weights.yaml"))
    assert lw.sweep.search["diffusion.likelihood_weight"].kind == "loguniform"
    assert lw.sweep.search["diffusion.likelihood_weight"].value == (1e-4, 1e-1)
    assert {v["model.family"] for v in lw.sweep.linked["family"].values()} == {"mdlm", "bijective"}
    qs = load_sweep_file(str(root / "quickstart.yaml"))
    assert 4 <= expected_trials(qs.model_dump(mode="json")) <= 8 and qs.model.size is None
    for f in root.glob("*.yaml"):
        assert f.read_text().startswith("#"), f"{f.name} must say in a comment what it answers"
    with pytest.raises(SpecError):
        load_sweep_file(str(root / "runs" / "quickstart.yaml"))


def test_family_grid_trials_resolve_their_own_schedule(tmp_path: Path) -> None:
    """The base family's default schedule does not leak into trials of another family (ar has none and
    rejects any); a schedule written in the base file is kept, and ar trials then fail validation."""
    sweep = load_sweep_file(str(_file(tmp_path, "  search:\n    model.family: {grid: [mdlm, ar, diffusion_lm]}")))
    got = {f: getattr(RunSpec.model_validate(trial_raw(sweep.base_raw(), {"model.family": f}, {})).diffusion, "schedule", None)
           for f in ("mdlm", "ar", "diffusion_lm")}
    assert got == {"mdlm": "loglinear", "ar": None, "diffusion_lm": "sqrt"}
    p = tmp_path / "explicit.yaml"
    p.write_text(_file(tmp_path, "  search:\n    model.family: {grid: [mdlm, ar]}").read_text()
                 .replace("model: {family: mdlm, size: tiny}", "model: {family: mdlm, size: tiny}\ndiffusion: {schedule: cosine}"))
    with pytest.raises(SpecError, match=r"model\.family='ar': diffusion\.schedule: not used by family ar"):
        load_sweep_file(str(p))
