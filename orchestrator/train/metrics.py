"""A small metrics-logger interface and its TensorBoard implementation (rank 0 only).

The runner logs through :class:`MetricsLogger`; non-zero ranks and tests get
:class:`NullLogger`. TensorBoard tags: ``train/loss`` (+ components), ``train/lr``,
``train/grad_norm``, ``train/tokens_per_sec``, ``train/skipped_steps``, ``val/nll``, ``val/nll_se``,
``val/ppl``, ``val/bpt``, ``val/tokens`` and ``samples/text``; staged runs add ``train/stage``, mdlm's
ATAT adds ``train/curriculum_phase``, ``train/importance_*`` scalars and the ``train/importance`` histogram.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

from torch import Tensor


class MetricsLogger(Protocol):
    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, tag: str, text: str, step: int) -> None: ...
    def log_histogram(self, tag: str, values: Tensor, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    """Logs nothing (non-zero ranks, unit tests)."""

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_text(self, tag: str, text: str, step: int) -> None:
        pass

    def log_histogram(self, tag: str, values: Tensor, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """``torch.utils.tensorboard.SummaryWriter`` under ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(str(log_dir), flush_secs=10)

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def log_histogram(self, tag: str, values: Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of the event files under ``log_dir`` (tests, `difflm results`, plots)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_tags(log_dir: Path) -> set[str]:
    """Scalar and text/tensor tags present under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags.get("scalars", [])) | set(tags.get("tensors", []))


def read_histograms(log_dir: Path) -> dict[str, list[int]]:
    """Histogram tags under ``log_dir`` -> the steps at which each was written (tests)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"histograms": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Histograms(tag)] for tag in acc.Tags().get("histograms", [])}
