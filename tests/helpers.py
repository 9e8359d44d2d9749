"""Scaffolding shared by tests: random init of zero-initialised layers, a recording metrics logger and
run dirs trained in-process (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from difflm.data import prepare_data
from difflm.families import build_model
from orchestrator.train.checkpoints import special_ids
from orchestrator.train.engine import TorchEngine, run_lr_lambda
from orchestrator.train.runner import Runner, WorkerContext
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
    torch.manual_seed(0)
    model = build_model(spec.model, spec.build_diffusion(), data.tokenizer.vocab_size, **special_ids(data.tokenizer))
    runner = Runner(spec, data, TorchEngine(model, spec.train, CPU, run_lr_lambda(spec)), WorkerContext(0, 1, CPU))
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
