"""The per-worker loop without Ray: determinism, validation, checkpoints, LR schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from difflm.data import prepare_data
from difflm.families import build_model
from orchestrator.train.engine import TorchEngine
from orchestrator.train.optim import lr_lambda
from orchestrator.train.metrics import MetricsLogger
from orchestrator.train.runner import Runner, WorkerContext
from orchestrator.spec.run import RunSpec, TrainConfig
from tests.helpers import RecordingLogger

@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread avoids oversubscription on shared CPUs (speed only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(tmp_path: Path, **train: object) -> RunSpec:
    base = {
        "model": {"family": "mdlm", "size": None, "d_model": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16},
        "diffusion": {"sample_steps": 4},
        "data": {"source": "builtin", "seq_len": 32, "max_documents": 200, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6,
                  "checkpoint_every": 12, "log_every": 3, "num_samples": 1, "eval_samples": 2, **train},
        "scaling": {"deepspeed": False, "device": "cpu"},
    }
    return RunSpec.model_validate(base)


def _runner(spec: RunSpec, logger: MetricsLogger | None = None, report=None) -> Runner:  # type: ignore[no-untyped-def]
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size)
    engine = TorchEngine(model, spec.train, torch.device("cpu"))
    return Runner(spec, data, engine, WorkerContext(0, 1, torch.device("cpu")), logger=logger, report=report)


def test_same_spec_and_seed_same_losses(tmp_path: Path) -> None:
    logs = []
    for _ in range(2):
        log = RecordingLogger()
        _runner(_spec(tmp_path), log).run()
        logs.append(log.scalars)
    assert logs[0]["train/loss"] == logs[1]["train/loss"]
    assert logs[0]["val/nll"] == logs[1]["val/nll"]
    other = RecordingLogger()
    _runner(_spec(tmp_path, seed=1), other).run()
    assert other.scalars["train/loss"] != logs[0]["train/loss"]


def test_validation_is_fixed_and_float64_exact(tmp_path: Path) -> None:
    r = _runner(_spec(tmp_path))
    a, b = r.validate(), r.validate()
    assert a == b  # fixed val noise: the same draws every time
    n, L = r.data.val.shape
    assert a["val/tokens"] == n * (L - 2)  # every counted val token (no BOS, no block-final EOS) exactly once
    assert 0 < a["val/nll_se"] < 0.2 * a["val/nll"]
    assert a["val/ppl"] == pytest.approx(math.exp(a["val/nll"]))
    assert a["val/bpt"] == pytest.approx(a["val/nll"] / math.log(2))


def test_run_logs_and_reports_checkpoints(tmp_path: Path) -> None:
    log = RecordingLogger()
    reports: list[tuple[dict, list[str]]] = []

    def report(metrics, ckpt):  # type: ignore[no-untyped-def]
        reports.append((metrics, sorted(p.name for p in ckpt.iterdir()) if ckpt else []))

    summary = _runner(_spec(tmp_path), log, report).run()
    assert summary["steps"] == 12
    assert [int(m["step"]) for m, _ in reports] == [0, 6, 12]
    assert reports[-1][1] == [
        "engine_state.pt", "manifest", "model.safetensors", "rng", "spec.yaml", "tokenizer", "trainer_state.json"
    ]
    assert reports[0][1] == [] and reports[1][1] == []  # checkpoint only every 12 steps
    assert [s for s, _ in log.scalars["train/loss"]] == [3, 6, 9, 12]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_sec", "train/nelbo", "train/skipped_steps", "val/ppl"} <= set(log.scalars)
    assert [v for _, v in log.scalars["train/skipped_steps"]] == [0, 0, 0, 0]
    assert len(log.texts["samples/text"]) == 2  # evals at 6 and 12: no samples of the untrained model at step 0
    assert summary["best_val_nll"] == min(v for _, v in log.scalars["val/nll"])


def test_eval_at_start_false_skips_only_the_step0_eval(tmp_path: Path) -> None:
    """A sweep trial's default: no eval of the initial weights; the later eval points are unchanged."""
    reports: list[int] = []
    on = RecordingLogger()
    _runner(_spec(tmp_path), on).run()
    off = RecordingLogger()
    _runner(_spec(tmp_path, eval_at_start=False), off, lambda m, c: reports.append(int(m["step"]))).run()
    assert reports == [6, 12]
    assert [s for s, _ in on.scalars["val/nll"]] == [0, 6, 12]
    assert off.scalars["val/nll"] == on.scalars["val/nll"][1:]  # the step-0 eval draws no training noise
    assert off.scalars["train/loss"] == on.scalars["train/loss"]


def test_save_load_roundtrip_continues_identically(tmp_path: Path) -> None:
    spec = _spec(tmp_path, max_steps=8, eval_every=4, checkpoint_every=8)
    a = _runner(spec)
    for _ in range(4):
        a.train_step()
    a.save(tmp_path / "ckpt")
    b = _runner(spec)
    with torch.no_grad():  # scramble what load must restore
        for p in b.engine.module.parameters():
            p.add_(1.0)
    torch.rand(100, generator=b._gen)
    b.load(tmp_path / "ckpt")  # weights, optimizer, scheduler, step, noise generator
    assert b.step == 4
    a.train_step()
    b.train_step()
    for (n, p), (_, q) in zip(a.engine.module.named_parameters(), b.engine.module.named_parameters()):
        assert torch.equal(p, q), n


def test_lr_schedule_warmup_then_cosine() -> None:
    t = TrainConfig(max_steps=110, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1, checkpoint_every=100, eval_every=10)
    f = lr_lambda(t)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    c = lr_lambda(t.model_copy(update={"lr_schedule": "constant"}))
    assert c(50) == 1.0 and c(109) == 1.0


def test_grad_accum_matches_bigger_batch_in_lr_units(tmp_path: Path) -> None:
    """Accumulation divides the loss: the gradient the optimizer gets after 2 x 4 accumulated is the mean of
    the two micro-batches' gradients (what one 8-sequence batch gives), not their sum. Compared on gradients:
    Adam's update is about lr whatever the gradient's scale, so an update-size check cannot see a 2x."""
    spec = _spec(tmp_path, grad_accum=2, max_steps=1, warmup_steps=0, grad_clip=1e9)  # no clipping
    r = _runner(spec)
    params = [p for p in r.engine.module.parameters() if p.requires_grad]
    micro: list[list[torch.Tensor]] = []
    seen: list[list[torch.Tensor]] = []
    forward = r.engine.forward

    def recording_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = forward(*args, **kwargs)
        grads = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
        micro.append([torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(params, grads)])
        return out

    def before_step(*_: object) -> None:  # what the optimizer is about to apply
        seen.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])

    r.engine.forward = recording_forward  # type: ignore[method-assign]
    r.engine.optimizer.register_step_pre_hook(before_step)
    r.train_step()
    assert r.step == 1 and len(micro) == 2 and len(seen) == 1
    mean = [(a + b) / 2 for a, b in zip(*micro)]
    total = torch.cat([g.flatten() for g in mean]).norm()
    assert total > 0
    err = torch.cat([(g - m).flatten() for g, m in zip(seen[0], mean)]).norm()
    assert err <= 1e-5 * total, f"accumulated gradient is not the micro-batch mean (|diff| {err:.3g} vs {total:.3g})"
