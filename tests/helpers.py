"""Scaffolding shared by tests: random init of zero-initialised layers, a recording metrics logger,
run dirs trained in-process (no Ray), a one-process gloo group for DeepSpeed in-process, and a
NaN-injecting test family."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import psutil
import pytest
import torch

from difflm.data import prepare_data
from difflm.families import Family, LossOutput
from orchestrator.build import build_run
from orchestrator.train.runner import WorkerContext
from orchestrator.spec.run import RunSpec

CPU = torch.device("cpu")
CKPT_NAME = "checkpoint_2026-01-01_00-00-00.000000"


def randomize_zero_init(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Give the zero-initialised layers (adaLN modulation, output) random values, so a fresh model's
    predictions depend on its input (at init they are constant by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


class RecordingLogger:
    """MetricsLogger that keeps every scalar and text in memory."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.texts: dict[str, list[str]] = {}
        self.histograms: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.scalars.setdefault(k, []).append((step, v))

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.texts.setdefault(tag, []).append(text)

    def log_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.histograms.setdefault(tag, []).append((step, values.clone()))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_run_dir(root: Path, name: str, spec_raw: dict[str, Any], steps: int = 8) -> Path:
    """Train ``steps`` steps in-process and lay the run out as `difflm train` leaves it:
    ROOT/NAME/checkpoint_*/ with checkpoints/{best,last} symlinks to it."""
    spec = RunSpec.model_validate(spec_raw)
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    runner = build_run(spec, data, CPU, ctx=WorkerContext(0, 1, CPU), backend="torch").runner
    assert runner is not None
    for _ in range(steps):
        runner.train_step()
    runner.last_val = runner.validate()
    runner.best_val_nll = runner.last_val["val/nll"]
    run_dir = root / name
    runner.save(run_dir / CKPT_NAME)
    (run_dir / "checkpoints").mkdir()
    for link in ("best", "last"):
        (run_dir / "checkpoints" / link).symlink_to(f"../{CKPT_NAME}")
    return run_dir


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single_process_group() -> None:
    """A world-size-1 gloo process group in this process, for DeepSpeed in-process on the CPU.

    Created once and kept for the session (a process group cannot be re-created). DeepSpeed also
    wants LOCAL_RANK in the environment: set it with monkeypatch in the test that builds the engine.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


class InjectNaN(Family):
    """Test-only family: wraps another and makes the loss non-finite on chosen training calls.

    ``bad(call)`` gets the 1-based count of training forward passes (micro-batches). By default the
    loss is multiplied by NaN (gradients NaN too); ``add_inf`` adds +inf instead, a constant, so the
    loss is inf while the gradients stay finite. Validation (eval mode or no grad) is never touched
    unless ``nan_val`` is set. A test hook, never a spec field.
    """

    def __init__(self, inner: Family, bad: Callable[[int], bool], nan_val: bool = False, add_inf: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.bad = bad
        self.nan_val = nan_val
        self.add_inf = add_inf
        self.calls = 0
        self.name = inner.name

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None) -> LossOutput:
        out = self.inner(tokens, valid, generator)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.bad(self.calls):
                bad = out.loss + float("inf") if self.add_inf else out.loss * float("nan")
                out = dataclasses.replace(out, loss=bad)
        elif self.nan_val:
            out = dataclasses.replace(out, nll_sum=out.nll_sum * float("nan"))
        return out

    def val_nll(self, tokens: torch.Tensor, counted: torch.Tensor, noise: Any) -> torch.Tensor:
        out = self.inner.val_nll(tokens, counted, noise)  # (B, K)
        return out * float("nan") if self.nan_val else out

    def sample(self, num: int, length: int, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.sample(num, length, steps, generator)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add contention on a shared CPU box. Import it into a test
    module (``from tests.helpers import one_thread``) to apply it to every test there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_workers(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The training worker processes among ``procs``: Ray Train's (Ray titles them ``ray::RayTrainWorker``)
    or the one worker process of a one-worker run on this machine (``orchestrator.local.worker``)."""
    out = []
    for proc in procs:
        try:
            cmd = " ".join(proc.cmdline())
            if "ray::RayTrainWorker" in cmd or "orchestrator.local.worker" in cmd:
                out.append(proc)
        except psutil.Error:  # gone meanwhile
            pass
    return out


def result_rows(trial_dir: Path) -> list[dict[str, Any]]:
    """A Tune trial's result rows so far (``result.json``; a line caught mid-write is skipped)."""
    out = []
    for line in (trial_dir / "result.json").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
