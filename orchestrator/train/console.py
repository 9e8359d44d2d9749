"""Console output on the driver: a live progress line on a terminal, sparse plain lines in a log file.

Workers never print for the user: rank 0 sends events (``progress``, ``eval``,
``log``) through a Ray queue and :class:`TrainConsole` renders them here.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


class TrainConsole:
    """Renders worker events. ``plain_every_s`` throttles plain (non-TTY) progress lines."""

    def __init__(self, stream: TextIO | None = None, plain_every_s: float = 30.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.console = Console(file=self.stream, highlight=False, soft_wrap=True)
        self.plain_every_s = plain_every_s
        self._last_plain = 0.0
        self._progress: Progress | None = None
        self._task: Any = None
        self.last_val_nll: float | None = None
        self.best_val_nll: float | None = None
        self.last_step = 0
        self.max_steps = 0
        self._last_progress: dict[str, Any] | None = None

    def info(self, message: str) -> None:
        self.console.print(message, markup=False)

    def _ensure_bar(self, total: int) -> None:
        if self._progress is None and self.tty:
            self._progress = Progress(
                TextColumn("[bold]train[/]"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, stats="")

    def handle(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "log":
            self.info(str(payload.get("message", "")))
        elif kind == "progress":
            self._on_progress(payload)
        elif kind == "eval":
            self._on_eval(payload)

    def _stats(self, p: dict[str, Any]) -> str:
        return (
            f"loss {_fmt(p.get('train/loss'))}  val_nll {_fmt(self.last_val_nll)}  "
            f"{_fmt(p.get('train/tokens_per_sec'), ',.0f')} tok/s"
        )

    def _on_progress(self, p: dict[str, Any]) -> None:
        self._last_progress = p
        self.last_step, self.max_steps = int(p["step"]), int(p["max_steps"])
        if self.tty:
            self._ensure_bar(self.max_steps)
            assert self._progress is not None
            self._progress.update(self._task, completed=self.last_step, stats=self._stats(p))
            return
        now = time.monotonic()
        if now - self._last_plain >= self.plain_every_s or self.last_step == self.max_steps:
            self._last_plain = now
            self.info(f"step {self.last_step}/{self.max_steps}  {self._stats(p)}")

    def _on_eval(self, p: dict[str, Any]) -> None:
        self.last_val_nll = p.get("val/nll")
        self.best_val_nll = p.get("val/best_nll")
        se = p.get("val/nll_se")
        pm = f" ± {se:.4f}" if isinstance(se, (int, float)) and se == se else ""  # se == se: not nan
        line = (
            f"eval step {int(p.get('step', 0))}: val_nll {_fmt(self.last_val_nll)}{pm} nats/token  "
            f"{'ppl' if p.get('exact_likelihood') else 'ppl<='} {_fmt(p.get('val/ppl'), '.4g')}  "
            f"best {_fmt(self.best_val_nll)}"
        )
        if self._progress is not None:
            self._progress.console.print(line, markup=False)
            if self._last_progress:  # the bar's val_nll column shows the new value at once
                self._progress.update(self._task, stats=self._stats(self._last_progress))
        else:
            self.info(line)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
