"""The per-worker training loop, independent of Ray: train_step / validate / save / load.

``orchestrator.train.launch.train_fn_per_worker`` builds a :class:`Runner` inside each Ray
Train worker; tests build one directly (world size 1, no cluster). The runner talks
to the outside through three callables only: a :class:`MetricsLogger` (TensorBoard
on rank 0), ``report(metrics, checkpoint_dir)`` (``ray.train.report`` under Ray) and
``emit(kind, payload)`` (progress events for the driver's console).

Hot path: one optimizer step makes no host synchronisation. Train metrics are summed
on the device and read (one sync) every ``log_every`` steps; validation, sampling
and checkpoints happen at their own cadence.

Stages (``spec.stages``, ``orchestrator/spec/stages.py``): before every step the runner looks
up the stage of the step, applies its switches when it changes (``Family.configure``) and tells
the family how far into the stage it is (``Family.set_progress``, the ATAT curriculum). Every
stage ends with a val point and a checkpoint; ``trainer_state.json`` names the stage. The LR
schedule is the engine's (``engine.run_lr_lambda``). All of it is a function of the step, so
``load`` restores the stage, the curriculum phase and the LR phase from the step alone.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from difflm.data import PreparedData, eval_batches_per_rank, iterate_eval_batches, iterate_train_batches
from difflm.families.base import Diagnostics
from difflm.sampling.diagnostics import sample_diagnostics
from orchestrator.train.engine import Engine
from orchestrator.train.metrics import MetricsLogger, NullLogger
from orchestrator.spec.run import RunSpec
from orchestrator.spec.stages import Stage, stage_at
from orchestrator.spec.yamlio import spec_yaml

Emit = Callable[[str, dict[str, Any]], None]


class Report(Protocol):
    def __call__(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device


def _noop_emit(kind: str, payload: dict[str, Any]) -> None:
    pass


def _all_reduce_sum(t: Tensor, world_size: int) -> Tensor:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class Runner:
    """Owns the loop state (step, best val NLL) around an :class:`Engine`."""

    def __init__(
        self,
        spec: RunSpec,
        data: PreparedData,
        engine: Engine,
        ctx: WorkerContext,
        *,
        logger: MetricsLogger | None = None,
        report: Report | None = None,
        emit: Emit = _noop_emit,
    ) -> None:
        self.spec = spec
        self.data = data
        self.engine = engine
        self.ctx = ctx
        self.logger = logger or NullLogger()
        self.report = report
        self.emit = emit
        self.step = 0
        self.best_val_nll = math.inf
        self.last_val: dict[str, float] = {}
        t = spec.train
        self._batches = self._train_batches(0)
        self._gen = torch.Generator(device=ctx.device).manual_seed(t.seed * 1_000_003 + ctx.rank)
        self._valid = torch.ones(t.micro_batch_size, spec.data.seq_len, dtype=torch.bool, device=ctx.device)
        self.tokens_per_step = t.micro_batch_size * t.grad_accum * ctx.world_size * spec.data.seq_len
        self._acc: dict[str, Tensor] = {}
        self._acc_steps = 0
        self.plan = spec.stage_plan()
        self.stage: Stage | None = None
        self._hist: dict[str, Tensor] = {}

    def _train_batches(self, start_batch: int):
        t = self.spec.train
        return iterate_train_batches(
            self.data.train,
            t.micro_batch_size,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            seed=t.seed,
            start_batch=start_batch,
        )

    # ------------------------------------------------------------------ steps
    def _to_device(self, batch: np.ndarray) -> Tensor:
        return torch.from_numpy(batch).to(self.ctx.device, non_blocking=True)  # (B, L) int64

    def _enter_stage(self, stage: Stage) -> None:
        """Apply ``stage``'s switches to the family (weights, optimizer and data stream carry over)."""
        self.engine.module.configure(stage.spec.diffusion)
        self.stage = stage
        if len(self.plan) > 1 and self.ctx.rank == 0:
            self.emit("log", {"message": f"stage {stage.index} ({stage.name}): steps {stage.start}-{stage.end}"})

    def train_step(self) -> None:
        """One optimizer step (grad_accum micro-batches) in the stage of the step; metrics stay on the device."""
        stage = stage_at(self.plan, self.step)
        if stage is not self.stage:
            self._enter_stage(stage)
        self.engine.module.set_progress(stage.progress(self.step))
        self.engine.train(True)
        for _ in range(self.spec.train.grad_accum):
            tokens = self._to_device(next(self._batches))
            out = self.engine.forward(tokens, self._valid, self._gen)
            self.engine.backward(out.loss)
            self.engine.step()
            parts = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.metrics.items()}}
            for key, val in parts.items():
                val = val.float()
                self._acc[key] = self._acc[key] + val if key in self._acc else val
            self._acc_steps += 1
            self._hist = out.histograms
        self.step += 1

    def _gather_train_metrics(self, elapsed: float, steps: int) -> dict[str, float]:
        """One host sync: averages since the last log point, LR, grad norm, throughput."""
        names = sorted(self._acc)
        stacked = torch.stack([self._acc[n] for n in names]) / max(1, self._acc_steps)
        stacked = _all_reduce_sum(stacked, self.ctx.world_size) / self.ctx.world_size
        values = stacked.tolist()
        self._acc, self._acc_steps = {}, 0
        out = {f"train/{n}": v for n, v in zip(names, values)}
        out["train/lr"] = self.engine.lr
        norm = self.engine.grad_norm()
        if norm is not None:
            out["train/grad_norm"] = norm
        out["train/tokens_per_sec"] = steps * self.tokens_per_step / max(elapsed, 1e-9)
        if len(self.plan) > 1 and self.stage is not None:
            out["train/stage"] = float(self.stage.index)
        for name, values in self._hist.items():  # this rank's last micro-batch: a snapshot, not an average
            q = torch.quantile(values.detach().float().cpu(), torch.tensor([0.1, 0.5, 0.9])).tolist()
            out.update({f"train/{name}_p10": q[0], f"train/{name}_p50": q[1], f"train/{name}_p90": q[2]})
        return out

    def _log_histograms(self) -> None:
        """The latest per-token distributions (e.g. ATAT importance) as TensorBoard histograms (rank 0)."""
        for name, values in self._hist.items():
            self.logger.log_histogram(f"train/{name}", values.detach().float().cpu(), self.step)

    # ------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """NELBO (or exact NLL for ar) over the val split: float64 sums / total tokens, fixed noise seed."""
        self.engine.train(False)
        t = self.spec.train
        gen = torch.Generator(device=self.ctx.device).manual_seed(t.eval_seed + self.ctx.rank)
        # float64 accumulators on the device; on the CPU for MPS, which has no float64
        acc_device = torch.device("cpu") if self.ctx.device.type == "mps" else self.ctx.device
        nll = torch.zeros((), dtype=torch.float64, device=acc_device)
        count = torch.zeros((), dtype=torch.float64, device=acc_device)
        batches = list(
            iterate_eval_batches(self.data.val, t.micro_batch_size, rank=self.ctx.rank, world_size=self.ctx.world_size)
        )
        # Every rank runs the same number of forwards: ZeRO-3 gathers parameters collectively, so a rank
        # with fewer val batches runs its first batch again and discards the result.
        counts = eval_batches_per_rank(len(self.data.val), t.micro_batch_size, self.ctx.world_size)
        n_forward = max(counts) if t.eval_batches is None else min(max(counts), t.eval_batches)
        n_real = len(batches) if t.eval_batches is None else min(len(batches), t.eval_batches)
        for i in range(n_forward):
            batch = batches[i] if i < n_real else (batches[0] if batches else self.data.val[:1].astype(np.int64))
            tokens = self._to_device(batch)
            valid = torch.ones_like(tokens, dtype=torch.bool)
            out = self.engine.forward(tokens, valid, gen)
            if i < n_real:
                nll += out.nll_sum.to(acc_device, torch.float64)
                count += out.num_tokens.to(acc_device, torch.float64)
        totals = _all_reduce_sum(torch.stack([nll, count]), self.ctx.world_size)
        total_nll, total_tokens = totals.tolist()
        if total_tokens == 0:
            raise RuntimeError("validation saw no tokens: the val split is empty")
        mean = total_nll / total_tokens
        self.engine.train(True)
        return {
            "val/nll": mean,
            "val/bpt": mean / math.log(2),
            "val/ppl": math.exp(min(mean, 700.0)),
            "val/tokens": total_tokens,
        }

    @torch.no_grad()
    def sample_texts(self) -> list[str]:
        """Unconditional samples for TensorBoard; every rank runs it (ZeRO-3 gathers are collective)."""
        n = self.spec.train.num_samples
        if n == 0:
            return []
        self.engine.train(False)
        gen = torch.Generator(device=self.ctx.device).manual_seed(self.spec.train.eval_seed)
        ids = self.engine.module.sample(n, self.spec.data.seq_len, self.spec.diffusion.sample_steps, gen)
        self.engine.train(True)
        return [self.data.tokenizer.decode(row.tolist()) for row in ids.cpu()]

    @torch.no_grad()
    def diagnostics(self) -> Diagnostics:
        """The family's extra val metrics on the first val batch, fixed seed (see Family.diagnostics)."""
        if len(self.data.val) == 0:
            return Diagnostics()
        self.engine.train(False)
        gen = torch.Generator(device=self.ctx.device).manual_seed(self.spec.train.eval_seed)
        tokens = self._to_device(np.asarray(self.data.val[: self.spec.train.micro_batch_size], dtype=np.int64))
        diag = self.engine.module.diagnostics(tokens, gen, self.data.tokenizer.decode)
        self.engine.train(True)
        return diag

    # ------------------------------------------------------------ checkpoints
    def save(self, directory: Path) -> None:
        """Weights (safetensors), optimizer + scheduler, step, resolved spec, tokenizer."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save(directory)
        # Each rank's noise generator, so a resumed run draws the same times and masks.
        (directory / "rng").mkdir(exist_ok=True)
        torch.save(self._gen.get_state(), directory / "rng" / f"rank{self.ctx.rank}.pt")
        full = getattr(self.engine, "full_state_dict", None)
        state = full() if full else self.engine.module.state_dict()
        if self.ctx.rank != 0:
            return
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(directory / "model.safetensors"))
        (directory / "spec.yaml").write_text(spec_yaml(self.spec))
        self.data.tokenizer.save(directory / "tokenizer")
        trainer_state: dict[str, Any] = {"step": self.step, "best_val_nll": self.best_val_nll, "val": self.last_val}
        if len(self.plan) > 1:  # informational: a resume derives the stage from the step
            done = stage_at(self.plan, max(self.step - 1, 0))
            trainer_state["stage"] = {"index": done.index, "name": done.name, "start": done.start, "end": done.end}
        (directory / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))

    def load(self, directory: Path) -> None:
        """Restore engine (weights + optimizer + scheduler) and loop state from a checkpoint folder."""
        self.engine.load(directory)
        rng = directory / "rng" / f"rank{self.ctx.rank}.pt"
        if rng.exists():
            self._gen.set_state(torch.load(rng, weights_only=True))
        state = json.loads((directory / "trainer_state.json").read_text())
        self.step = int(state["step"])
        self.best_val_nll = float(state["best_val_nll"])
        self.last_val = state.get("val", {})
        # Continue the data stream where the checkpointed run left it, not from its start.
        self._batches = self._train_batches(self.step * self.spec.train.grad_accum)

    # ------------------------------------------------------------------- loop
    def _eval_point(self, checkpoint: bool) -> dict[str, float]:
        val = self.validate()
        self.last_val = val
        self.best_val_nll = min(self.best_val_nll, val["val/nll"])
        metrics = {**val, "val/best_nll": self.best_val_nll, "step": float(self.step)}
        texts = self.sample_texts()
        diag = self.diagnostics()
        if self.ctx.rank == 0:
            self.logger.log_scalars({**val, **{f"val/{k}": v for k, v in diag.scalars.items()}}, self.step)
            for name, text in diag.texts.items():
                self.logger.log_text(f"diagnostics/{name}", text, self.step)
            for warning in diag.warnings:
                self.emit("log", {"message": f"warning (step {self.step}): {warning}"})
            if texts:
                body = "\n\n".join(f"**{i}.** {t!r}" for i, t in enumerate(texts))
                self.logger.log_text("samples/text", body, self.step)
                # distinct-n, repetition, duplicates: repetition and collapse show up here first
                sdiag = sample_diagnostics(texts)
                self.logger.log_scalars({f"samples/{k}": v for k, v in sdiag.scalars().items()}, self.step)
                for warning in sdiag.warnings:
                    self.emit("log", {"message": f"warning (step {self.step}): samples: {warning}"})
            self.logger.flush()
            self.emit("eval", {**metrics, "samples": texts[:2]})
        if self.report is not None:
            if checkpoint:
                tmp = Path(tempfile.mkdtemp(prefix="difflm-ckpt-"))
                try:
                    self.save(tmp)
                    self.report(metrics, tmp if any(tmp.iterdir()) else None)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            else:
                self.report(metrics, None)
        return metrics

    def run(self) -> dict[str, Any]:
        """Train to max_steps with eval, logging and checkpoints; return the summary (meaningful on rank 0)."""
        t = self.spec.train
        if self.step == 0:
            self._eval_point(checkpoint=False)  # the step-0 reference value
        last_log_time, last_log_step = time.perf_counter(), self.step
        start = time.perf_counter()
        while self.step < t.max_steps:
            self.train_step()
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                now = time.perf_counter()
                metrics = self._gather_train_metrics(now - last_log_time, self.step - last_log_step)
                last_log_time, last_log_step = now, self.step
                loss = metrics["train/loss"]
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite training loss ({loss}) at step {self.step}; lower train.lr or use fp32"
                    )
                if self.ctx.rank == 0:
                    self.logger.log_scalars(metrics, self.step)
                    self._log_histograms()
                    self.emit("progress", {"step": self.step, "max_steps": t.max_steps, **metrics})
            # Every stage ends with a val point and a checkpoint, so each stage's result is kept.
            stage_end = self.stage is not None and self.step == self.stage.end and len(self.plan) > 1
            final = self.step == t.max_steps
            if self.step % t.eval_every == 0 or final or stage_end:
                self._eval_point(checkpoint=final or stage_end or self.step % t.checkpoint_every == 0)
        self.logger.close()
        return {
            "steps": self.step,
            "best_val_nll": self.best_val_nll,
            "final_val": self.last_val,
            "wall_time_s": time.perf_counter() - start,
            "tokens_per_step": self.tokens_per_step,
        }
