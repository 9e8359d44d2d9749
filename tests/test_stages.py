"""Staged training and the ATAT curriculum in the per-worker loop (no Ray): stage specs, per-stage LR,
stage switches, phases at the configured steps, checkpoints per stage, and resume mid-stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from difflm.data import prepare_data
from difflm.families import build_model
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec
from orchestrator.spec.yamlio import validate_as
from orchestrator.train.engine import TorchEngine
from orchestrator.train.optim import lr_lambda, run_lr_lambda
from orchestrator.train.metrics import MetricsLogger
from orchestrator.train.runner import Runner, WorkerContext
from tests.helpers import RecordingLogger, one_thread  # noqa: F401 (one_thread: autouse fixture)

CPU = torch.device("cpu")
HEAD = {"head_width": 16, "head_layers": 1, "head_heads": 2}




def staged_raw(tmp_path: Path, **train: Any) -> dict[str, Any]:
    return {
        "model": {"family": "mdlm", "size": None, "d_model": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16},
        "diffusion": {"sample_steps": 4, "atat": dict(HEAD, curriculum_bounds=[0.25, 0.5])},
        "data": {"source": "builtin", "seq_len": 32, "max_documents": 200, "cache_dir": str(tmp_path / "cache")},
        "train": {"micro_batch_size": 4, "lr": 2e-3, "warmup_steps": 2, "eval_every": 100, "checkpoint_every": 100,
                  "log_every": 1, "num_samples": 0, **train},
        "scaling": {"deepspeed": False, "device": "cpu"},
        "stages": [
            {"name": "plain", "steps": 3},
            {"name": "importance", "steps": 3, "set": {"diffusion.atat.importance_head": True, "train.lr": 1e-3}},
            {"name": "adaptive", "steps": 8, "set": {"diffusion": {"atat": {"adaptive_masking": True, "curriculum": True}},
                                                     "train.lr_schedule": "phases"}},
        ],
    }


def runner(spec: RunSpec, logger: MetricsLogger | None = None, report: Any = None) -> Runner:
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, spec.build_diffusion(), data.tokenizer.vocab_size)
    engine = TorchEngine(model, spec.train, CPU, run_lr_lambda(spec))
    return Runner(spec, data, engine, WorkerContext(0, 1, CPU), logger=logger, report=report)


def test_stage_plan_is_cumulative_and_sets_max_steps(tmp_path: Path) -> None:
    spec = RunSpec.model_validate(staged_raw(tmp_path))
    plan = spec.stage_plan()
    assert spec.train.max_steps == 14
    assert [(s.name, s.start, s.end) for s in plan] == [("plain", 0, 3), ("importance", 3, 6), ("adaptive", 6, 14)]
    atat = [s.spec.diffusion.atat for s in plan]
    assert [a.importance_head for a in atat] == [False, True, True]  # stage 2 keeps stage 1's switch
    assert [a.adaptive_masking for a in atat] == [False, False, True]
    assert [s.spec.train.lr for s in plan] == [2e-3, 1e-3, 1e-3]
    assert plan[2].spec.train.lr_phases == (0.25, 0.5)  # the LR phases default to the curriculum's bounds
    assert [s.spec.train.max_steps for s in plan] == [3, 3, 8]
    # built once with the head any stage needs; stage 0 itself runs plain
    assert spec.build_diffusion().atat.importance_head and not spec.diffusion.atat.importance_head


@pytest.mark.parametrize(
    ("stages", "train", "message"),
    [
        ([{"steps": 3, "set": {"model.d_model": 64}}], {}, r"stages\[0\]\.set: model\.d_model cannot change between stages"),
        ([{"steps": 3, "set": {"diffusion.atat.head_width": 8}}], {}, r"sizes the importance head"),
        ([{"steps": 3, "set": {"diffusion.atat.curriculum": True}}], {}, r"stages\[0\]: .*curriculum moves"),
        ([{"steps": 3}], {"max_steps": 7}, r"train\.max_steps \(7\) differs from the stages' total \(3\)"),
        ([{"steps": 3, "set": {"train.micro_batch_size": 2}}], {}, r"train\.micro_batch_size cannot change"),
    ],
)
def test_bad_stages_are_spec_errors(tmp_path: Path, stages: list[Any], train: dict[str, Any], message: str) -> None:
    raw = staged_raw(tmp_path)
    raw["stages"] = stages
    raw["train"].update(train)
    with pytest.raises(SpecError, match=message):
        validate_as(RunSpec, raw, "spec.yaml")


def test_atat_on_a_family_without_it_is_a_spec_error(tmp_path: Path) -> None:
    raw = staged_raw(tmp_path)
    raw["model"]["family"] = "ar"
    raw["stages"] = None
    raw["diffusion"] = {"atat": {"importance_head": True}}
    with pytest.raises(SpecError, match="diffusion.atat: not used by family ar"):
        validate_as(RunSpec, raw, "spec.yaml")


def test_lr_phases_and_per_stage_schedules(tmp_path: Path) -> None:
    spec = RunSpec.model_validate(staged_raw(tmp_path))
    f = run_lr_lambda(spec)
    # stage 0: warmup 2 steps then cosine over its 3 steps; stage 1 restarts warmup at half the lr
    assert [round(f(s), 4) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert [round(f(s), 4) for s in (3, 4)] == [0.25, 0.5]
    # stage 2 (8 steps, phases 0.25/0.5): warmup 2 steps, constant 2, cosine to 0.1 at its end
    assert [round(f(s) * 2, 4) for s in (6, 7, 8, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert f(10) * 2 == pytest.approx(1.0) and f(13) * 2 < 0.35 and f(14) * 2 == pytest.approx(0.1)
    plain = lr_lambda(spec.stage_plan()[2].spec.train)
    assert [plain(s) for s in range(8)] == [f(6 + s) * 2 for s in range(8)]


def test_staged_run_switches_stages_and_curriculum_at_the_configured_steps(tmp_path: Path) -> None:
    log = RecordingLogger()
    reports: list[tuple[int, bool]] = []
    r = runner(RunSpec.model_validate(staged_raw(tmp_path)), log,
               report=lambda m, ckpt: reports.append((int(m["step"]), ckpt is not None)))
    r.run()
    stage = dict(log.scalars["train/stage"])
    assert [stage[s] for s in range(1, 15)] == [0] * 3 + [1] * 3 + [2] * 8
    # the curriculum lives in stage 2 (steps 7..14 finish it); bounds 0.25/0.5 of its 8 steps
    phase = dict(log.scalars["train/curriculum_phase"])
    assert sorted(phase) == list(range(7, 15))
    assert [phase[s] for s in range(7, 15)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert [s for s, _ in log.scalars["train/importance_loss"]] == list(range(4, 15))  # the head from stage 1 on
    assert [s for s, _ in log.histograms["train/importance"]] == list(range(4, 15))
    assert {"train/importance_p10", "train/importance_p50", "train/importance_p90"} <= set(log.scalars)
    # every stage ends with a val point and a checkpoint
    assert [s for s, c in reports if c] == [3, 6, 14]
    lr = dict(log.scalars["train/lr"])
    assert lr[3] == pytest.approx(0.5e-3)  # stage 1's first step: warmup restarted, at stage 1's lr


def test_resume_mid_curriculum_continues_in_the_same_stage_and_phase(tmp_path: Path) -> None:
    spec = RunSpec.model_validate(staged_raw(tmp_path))
    a = runner(spec)
    for _ in range(10):  # stage 2, 4 of 8 steps in: the medium -> hard boundary
        a.train_step()
    a.save(tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["stage"] == {"index": 2, "name": "adaptive", "start": 6, "end": 14}

    b = runner(spec)
    b.load(tmp_path / "ckpt")
    assert b.stage is None  # nothing saved names the stage: the next step derives it
    a._gather_train_metrics(1.0, 1)  # drop a's running averages of steps 1-10 (b starts with none)
    log_a, log_b = RecordingLogger(), RecordingLogger()
    for r, log in ((a, log_a), (b, log_b)):
        r.logger = log
        for _ in range(3):
            r.train_step()
            log.log_scalars(r._gather_train_metrics(1.0, 1), r.step)
    assert b.stage is not None and b.stage.name == "adaptive" and b.engine.module.atat.curriculum
    assert log_b.scalars["train/curriculum_phase"] == log_a.scalars["train/curriculum_phase"] == [(11, 2.0), (12, 2.0), (13, 2.0)]
    assert log_b.scalars["train/lr"] == log_a.scalars["train/lr"]
    assert log_b.scalars["train/loss"] == log_a.scalars["train/loss"]
    for (n, p), (_, q) in zip(a.engine.module.named_parameters(), b.engine.module.named_parameters()):
        assert torch.equal(p, q), n


def test_unstaged_spec_is_one_stage_and_logs_no_stage(tmp_path: Path) -> None:
    raw = staged_raw(tmp_path, max_steps=4)
    raw["stages"] = None
    spec = RunSpec.model_validate(raw)
    assert [(s.name, s.start, s.end) for s in spec.stage_plan()] == [("main", 0, 4)]
    assert run_lr_lambda(spec)(3) == lr_lambda(spec.train)(3)
    log = RecordingLogger()
    runner(spec, log).run()
    assert "train/stage" not in log.scalars and "train/curriculum_phase" not in log.scalars
