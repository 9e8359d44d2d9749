"""One construction path (orchestrator/build.py): every caller that builds what a run trains builds a staged
ATAT spec's importance head and gives its engine the run's LR multiplier.

Before issue 19 the benches built from ``spec.diffusion`` (no head for a head switched on by a later stage)
and ``bench grid`` gave its engine no LR lambda (constant LR); checkpoints, doctor and the worker each
had their own copy of the build.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from difflm.data import prepare_data
from orchestrator import build
from orchestrator.spec.run import RunSpec
from orchestrator.train.optim import run_lr_lambda
from tests.helpers import CPU, make_run_dir

REPO = Path(__file__).resolve().parents[1]

STAGED: dict[str, Any] = {
    "model": {"family": "mdlm", "size": None, "d_model": 32, "n_layers": 1, "n_heads": 2, "cond_dim": 16},
    "diffusion": {"sample_steps": 2, "atat": {"head_width": 16, "head_layers": 1, "head_heads": 2}},
    "data": {"seq_len": 32},
    "train": {"micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "eval_every": 6, "checkpoint_every": 6,
              "eval_batches": 1, "eval_samples": 2, "num_samples": 0, "eval_at_start": False},
    "scaling": {"device": "cpu", "deepspeed": False, "zero_stage": 0},
    "stages": [{"name": "plain", "steps": 3},
               {"name": "head", "steps": 3, "set": {"diffusion.atat.importance_head": True, "train.lr": 3e-4}}],
}


@pytest.fixture()
def built(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every model build_family returns and every BuiltRun build_run returns, in call order."""
    seen: list[Any] = []
    family, run = build.build_family, build.build_run

    def spy_family(*a: Any, **k: Any) -> Any:
        seen.append(family(*a, **k))
        return seen[-1]

    def spy_run(*a: Any, **k: Any) -> Any:
        seen.append(run(*a, **k))
        return seen[-1]

    # every orchestrator module that imported the names (`from orchestrator.build import build_family`) before this
    # test ran holds its own reference: patch those too, or the count depends on test order
    for mod in [build, *(m for n, m in list(sys.modules.items()) if n.startswith("orchestrator."))]:
        if getattr(mod, "build_family", None) is family:
            monkeypatch.setattr(mod, "build_family", spy_family)
        if getattr(mod, "build_run", None) is run:
            monkeypatch.setattr(mod, "build_run", spy_run)
    return seen


def _lambdas(engine: Any) -> list[float]:
    return [engine.scheduler.lr_lambdas[0](k) for k in range(6)]


def test_every_caller_builds_the_staged_head_and_the_runs_lr_schedule(tmp_path: Path, built: list[Any]) -> None:
    from orchestrator.bench.grid import run_point
    from orchestrator.bench.throughput import BarePath, RunnerPath
    from orchestrator.doctor.dynamics import build as doctor_build
    from orchestrator.rundir.checkpoints import load_checkpoint

    spec = RunSpec.model_validate(STAGED)
    assert spec.diffusion.atat.importance_head is False  # only the second stage turns the head on
    expected = [run_lr_lambda(spec)(k) for k in range(6)]
    assert expected[3] == pytest.approx(0.15) and expected[4] == pytest.approx(0.3)  # stage 2 warms up again, at 0.3x
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _m: None)
    torch.set_num_threads(1)

    assert doctor_build(spec, data, CPU).importance is not None
    assert BarePath(spec, data, CPU).model.importance is not None
    runner = RunnerPath("torch", spec, data, CPU).runner
    assert runner.engine.module.importance is not None and _lambdas(runner.engine) == expected
    run_dir = make_run_dir(tmp_path, "run", STAGED, steps=1)  # the tests' run folders build the same way
    assert load_checkpoint(run_dir, device="cpu").model.importance is not None
    run_point(STAGED, tmp_path / "grid", threads=1)  # bench grid: trains the 6 steps
    runs = [b for b in built if isinstance(b, build.BuiltRun)]
    assert len(runs) == 2  # bench throughput's runner path, bench grid
    for b in runs:
        assert b.model.importance is not None and _lambdas(b.engine) == expected
    families = [b for b in built if not isinstance(b, build.BuiltRun)]
    # doctor, bare loop, runner path, make_run_dir (build_run inside), checkpoint, grid
    assert len(families) == 6 and all(m.importance is not None for m in families)


def test_nothing_outside_orchestrator_build_constructs_a_model_or_an_engine() -> None:
    """The worker and every other orchestrator module build through orchestrator/build.py (the worker
    runs under Ray, so this is checked on its source: it calls build_run and constructs nothing itself)."""
    makers = {"build_model", "TorchEngine", "DeepSpeedEngine"}
    offenders = []
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        if path.name == "build.py" and path.parent.name == "orchestrator":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                # doctor's probes wrap the model build_family gave them in an engine of their own (a fixed
                # LR for memorisation / timing), which is the point of the probe, not a second build
                if name in makers and not (path.name == "dynamics.py" and name == "TorchEngine"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}(...)")
    assert not offenders, "build through orchestrator.build instead:\n" + "\n".join(offenders)
    worker = (REPO / "orchestrator/train/worker.py").read_text()
    assert "build_run(spec, data, device" in worker
