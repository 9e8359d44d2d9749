"""Long-run reliability in process (no Ray): exact resume, gradient accumulation, non-finite guard,
checkpoint verification and fallback, no unpickling, atomic writes. Both engines: plain torch and
DeepSpeed ZeRO-2 (a one-process gloo group on the CPU)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from difflm.atomic import atomic_symlink, atomic_write_text
from difflm.data import prepare_data
from difflm.families import Family, build_model
from orchestrator.rundir.ckpt_files import (
    CorruptCheckpointError,
    checkpoint_dir_name,
    pick_resume_checkpoint,
    update_links,
    verify_checkpoint,
)
from orchestrator.train.engine import DeepSpeedEngine, TorchEngine, UnsafeCheckpointError
from orchestrator.errors import SpecError, TrainingStopped
from orchestrator.train.runner import Runner, WorkerContext
from orchestrator.spec.run import RunSpec
from tests.helpers import CPU, InjectNaN, RecordingLogger, single_process_group

ENGINES = ["torch", "deepspeed"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is faster than two and immune to oversubscribed shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ds_env(monkeypatch: pytest.MonkeyPatch) -> None:
    single_process_group()
    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed asks for it even with a process group in place


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _spec(cache: Path, engine: str = "torch", family: str = "mdlm", zero: int = 2, **train: Any) -> RunSpec:
    return RunSpec.model_validate({
        "model": {"family": family, "size": None, "d_model": 32, "n_layers": 1, "n_heads": 2, "cond_dim": 16},
        "diffusion": {"sample_steps": 2} if family != "ar" else {},
        "data": {"source": "builtin", "seq_len": 32, "max_documents": 120, "cache_dir": str(cache)},
        "train": {"max_steps": 8, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 8, "checkpoint_every": 8, "log_every": 1, "num_samples": 0, "eval_batches": 1,
                  "ema": 0.9, **train},
        "scaling": {"deepspeed": engine == "deepspeed", "zero_stage": zero if engine == "deepspeed" else 0,
                    "device": "cpu"},
    })


def _runner(spec: RunSpec, wrap: Callable[[Family], Family] | None = None,
            logger: RecordingLogger | None = None) -> Runner:
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size)
    if wrap is not None:
        model = wrap(model)
    engine = DeepSpeedEngine(model, spec, CPU) if spec.scaling.deepspeed else TorchEngine(model, spec.train, CPU)
    return Runner(spec, data, engine, WorkerContext(0, 1, CPU), logger=logger)


def _params(r: Runner) -> list[torch.Tensor]:
    """The whole weights (gathered under ZeRO-3, where a rank's parameters may be released)."""
    return [v.detach().clone() for v in r.engine.full_state_dict().values()]


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("engine,zero", [("torch", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2),
                                         ("deepspeed", 3)])
def test_resume_from_step_k_equals_uninterrupted_run(cache: Path, tmp_path: Path, engine: str, zero: int, request) -> None:  # type: ignore[no-untyped-def]
    """Loss curve, LR, val/nll (on the EMA), weights and EMA after resuming at step 4 equal the
    uninterrupted run's from step 4 on, bit for bit (grad_accum 2, warmup + cosine, EMA on), for the
    torch engine and every ZeRO stage (ZeRO-3: the EMA lives in each rank's partition)."""
    if engine == "deepspeed":
        request.getfixturevalue("ds_env")
    spec = _spec(cache, engine, zero=zero)
    full = RecordingLogger()
    a = _runner(spec, logger=full)
    a.run()

    b = _runner(spec)
    for _ in range(4):
        b.train_step()
    b.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "ema.safetensors").is_file()

    rest = RecordingLogger()
    c = _runner(spec, logger=rest)
    torch.rand(7, generator=c._gen)  # scramble what load must restore
    c.load(tmp_path / "ckpt")
    assert c.step == 4 and c.ema is not None and c.ema.updates == 4
    c.run()

    def after(log: RecordingLogger, tag: str) -> list[tuple[int, float]]:
        return [(s, v) for s, v in log.scalars[tag] if s > 4]

    assert [s for s, _ in after(rest, "train/loss")] == [5, 6, 7, 8]
    for tag in ("train/loss", "train/lr", "train/nelbo", "val/nll"):
        assert after(rest, tag) == after(full, tag), tag
    wa, wc = a.engine.full_state_dict(), c.engine.full_state_dict()  # gathered under ZeRO-3
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a.ema is not None and c.ema is not None
    for p, q in zip(a.ema.shadow, c.ema.shadow):
        assert torch.equal(p, q)
    # and the EMA is not just the weights: validation really used something else
    assert not all(torch.equal(p, s) for p, s in zip(_params(a), a.ema.shadow))


# --------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("engine", ENGINES)
def test_accumulated_gradient_equals_large_batch_gradient(cache: Path, engine: str, request) -> None:  # type: ignore[no-untyped-def]
    """2 micro-batches of 4 accumulate exactly the gradient of one batch of 8 (ar: no noise, every
    row has the same token count), before clipping and before the optimizer touches it."""
    if engine == "deepspeed":
        request.getfixturevalue("ds_env")
    spec = _spec(cache, engine, family="ar", grad_accum=2, micro_batch_size=4, ema=None, grad_clip=1e6)
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size)
    with torch.no_grad():  # leave the zero-initialised output layer: every gradient is then non-zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = copy.deepcopy(model)
    batch = torch.tensor(data.train[:8], dtype=torch.long)  # (8, 32)
    valid = torch.ones_like(batch, dtype=torch.bool)
    ref(batch, valid).loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters()}

    eng = DeepSpeedEngine(model, spec, CPU) if engine == "deepspeed" else TorchEngine(model, spec.train, CPU)
    eng.train(True)
    for i, half in enumerate((slice(0, 4), slice(4, 8))):
        out = eng.forward(batch[half], valid[half])
        eng.backward(out.loss)
        if i == 0:
            eng.step()  # not the boundary: counts the micro-batch, no update
    if engine == "deepspeed":
        from deepspeed.utils import safe_get_full_grad

        got = {n: safe_get_full_grad(p) for n, p in eng.module.named_parameters()}
    else:
        got = {n: p.grad for n, p in eng.module.named_parameters()}
    assert set(got) == set(want)
    for n in want:
        assert want[n].abs().max() > 1e-5, n
        torch.testing.assert_close(got[n], want[n], rtol=2e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_rank_deepspeed_skips_the_identity_all_reduce(cache: Path, precision: str, ds_env: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """World size 1: DeepSpeed's gradient all-reduce would only flatten, reduce over one rank and copy back
    (1.3% of a `small` step); the engine skips it, and the update is the one the reduction would give."""
    spec = _spec(cache, "deepspeed", family="ar", grad_accum=2, micro_batch_size=4, ema=None, precision=precision)
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    batch = torch.tensor(data.train[:8], dtype=torch.long)  # (8, 32)
    valid = torch.ones_like(batch, dtype=torch.bool)
    weights = []
    for skip in (True, False):
        torch.manual_seed(0)
        eng = DeepSpeedEngine(build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size), spec, CPU)
        assert eng.engine.enable_backward_allreduce is False
        eng.engine.enable_backward_allreduce = not skip  # the reference: DeepSpeed's own reduction
        calls = []
        real = eng.engine.allreduce_gradients
        monkeypatch.setattr(eng.engine, "allreduce_gradients", lambda *a, **k: (calls.append(1), real(*a, **k)))
        eng.train(True)
        for half in (slice(0, 4), slice(4, 8)):
            out = eng.forward(batch[half], valid[half])
            eng.backward(out.loss)
            eng.step()
        assert (len(calls) == 0) if skip else (len(calls) >= 1)
        weights.append([p.detach().float().clone() for p in eng.module.parameters()])
    for got, want in zip(*weights):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any((w != 0).any() for w in weights[0])


# --------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("engine,zero,precision", [("torch", 0, "fp32"), ("deepspeed", 0, "fp32"),
                                                   ("deepspeed", 2, "bf16"), ("deepspeed", 3, "fp32")])
def test_nonfinite_step_is_skipped_and_a_run_of_them_stops(cache: Path, engine: str, zero: int, precision: str,
                                                           request) -> None:  # type: ignore[no-untyped-def]
    """A NaN loss at step 3 leaves weights, optimizer state and EMA untouched and is counted; NaN from
    step 6 on stops the run at the next log point with "non-finite loss at step 8" (3 in a row).
    (DeepSpeed 0.19 skips an invalid gradient norm itself under ZeRO-1/2/3 and bf16; the torch engine and
    fp32 ZeRO-0 rely on difflm's own skip; the count and the stop are difflm's everywhere.)"""
    if engine == "deepspeed":
        request.getfixturevalue("ds_env")
    spec = _spec(cache, engine, zero=zero, grad_accum=1, max_steps=12, log_every=4, eval_every=12,
                 checkpoint_every=12, max_nonfinite=3, precision=precision)
    log = RecordingLogger()
    r = _runner(spec, wrap=lambda m: InjectNaN(m, lambda call: call == 3 or call >= 6), logger=log)
    for step in range(1, 6):
        if step == 3:
            before, ema_before = _params(r), [s.clone() for s in r.ema.shadow]  # type: ignore[union-attr]
        r.train_step()
        if step == 3:
            assert all(torch.equal(p, q) for p, q in zip(before, _params(r)))
            assert all(torch.equal(p, q) for p, q in zip(ema_before, r.ema.shadow))  # type: ignore[union-attr]
        elif step == 4:
            assert not all(torch.equal(p, q) for p, q in zip(before, _params(r)))  # training goes on
    good = _params(r)
    with pytest.raises(TrainingStopped, match=r"non-finite loss at step 8 \(3 steps in a row skipped"):
        r.run()
    assert r.step == 8  # noticed at the log point, no later
    assert log.scalars["train/skipped_steps"] == [(8, 4.0)]
    assert all(torch.equal(p, q) for p, q in zip(good, _params(r)))  # nothing reached the weights
    assert all(torch.isfinite(s).all() for s in r.ema.shadow)  # type: ignore[union-attr]
    losses = [v for _, v in log.scalars["train/loss"]]
    assert losses and all(v == v for v in losses)  # the logged mean leaves the NaN micro-batches out


def test_nan_val_metric_is_an_error(cache: Path) -> None:
    r = _runner(_spec(cache), wrap=lambda m: InjectNaN(m, lambda call: False, nan_val=True))
    with pytest.raises(TrainingStopped, match=r"non-finite val/nll \(nan\) at step 0"):
        r.run()


# ------------------------------------------------------------ checkpoints on disk
def _two_checkpoints(cache: Path, run_dir: Path) -> Runner:
    r = _runner(_spec(cache, max_steps=4))
    for _ in range(2):
        r.train_step()
        r.train_step()
        r.last_val, r.best_val_nll = {"val/nll": 1.0}, 1.0
        r.save(run_dir / checkpoint_dir_name(run_dir, r.step))
    return r


def test_truncated_last_checkpoint_falls_back_to_the_previous(cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _two_checkpoints(cache, run_dir)
    last = run_dir / "checkpoint_00000004"
    weights = last / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CorruptCheckpointError, match=rf"model\.safetensors: {size // 2:,} bytes where rank 0 wrote {size:,}"):
        verify_checkpoint(last)
    logs: list[str] = []
    info = pick_resume_checkpoint(run_dir, last, logs.append)
    assert info is not None and info.path == (run_dir / "checkpoint_00000002").resolve() and info.step == 2
    assert len(logs) == 1 and logs[0].startswith("checkpoint checkpoint_00000004 unusable:") and "truncated" in logs[0]
    resumed = _runner(_spec(cache, max_steps=4))
    resumed.load(info.path)
    assert resumed.step == 2
    # a rank that never finished writing, and nothing usable at all
    (run_dir / "checkpoint_00000002" / "manifest" / "rank0.json").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"rank0\.json: missing; the checkpoint is incomplete"):
        verify_checkpoint(run_dir / "checkpoint_00000002")
    with pytest.raises(CorruptCheckpointError, match="no usable checkpoint"):
        pick_resume_checkpoint(run_dir, last, logs.append)


def test_checkpoint_outside_the_run_folder_is_refused(cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _two_checkpoints(cache, run_dir)
    with pytest.raises(SpecError, match="outside the run folder"):
        pick_resume_checkpoint(tmp_path / "other", run_dir / "checkpoint_00000004", print)


def test_best_and_last_links(cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _two_checkpoints(cache, run_dir)
    update_links(run_dir, run_dir / "checkpoint_00000002", is_best=True)
    update_links(run_dir, run_dir / "checkpoint_00000004", is_best=False)
    links = run_dir / "checkpoints"
    assert (links / "last").resolve() == (run_dir / "checkpoint_00000004").resolve()
    best = (links / "best").resolve()
    assert best == (links / "best-checkpoint_00000002").resolve()
    # hard links: the best survives Ray deleting the original folder, and verifies
    import shutil

    shutil.rmtree(run_dir / "checkpoint_00000002")
    assert verify_checkpoint(best).step == 2
    update_links(run_dir, run_dir / "checkpoint_00000004", is_best=True)
    assert sorted(p.name for p in links.iterdir()) == ["best", "best-checkpoint_00000004", "last"]


def test_crafted_pickle_is_refused(cache: Path, tmp_path: Path) -> None:
    """An engine_state.pt that unpickles code is refused, naming the file; the payload never runs."""
    r = _runner(_spec(cache, max_steps=2))
    r.train_step()
    ckpt = tmp_path / "ckpt"
    r.save(ckpt)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    torch.save({"optimizer": Payload(), "scheduler": {}, "micro": 0}, ckpt / "engine_state.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"engine_state\.pt: refusing to load: it holds pickled Python"):
        _runner(_spec(cache, max_steps=2)).load(ckpt)
    assert not marker.exists()
    with pytest.raises(CorruptCheckpointError, match=r"engine_state\.pt: .*(bytes where|differ)"):
        verify_checkpoint(ckpt)  # and the manifest notices the swap before any load is tried
    torch.load(ckpt / "engine_state.pt", weights_only=False)  # the payload is real: a plain load runs it
    assert marker.exists()


# ---------------------------------------------------------------------- atomic
def test_atomic_writes_replace_whole_or_not_at_all(tmp_path: Path) -> None:
    f = tmp_path / "summary.json"
    atomic_write_text(f, "old")
    os.umask(old := os.umask(0o022))
    assert (f.stat().st_mode & 0o777) == (0o666 & ~old)
    with pytest.raises(RuntimeError):
        from difflm.atomic import atomic_path

        with atomic_path(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    atomic_symlink(a, tmp_path / "last")
    atomic_symlink(b, tmp_path / "last")
    assert (tmp_path / "last").resolve() == b and os.readlink(tmp_path / "last") == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "last", "summary.json"]
