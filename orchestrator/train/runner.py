"""The per-worker training loop, independent of Ray: train_step / validate / save / load.

``orchestrator.train.launch.train_fn_per_worker`` builds a :class:`Runner` inside each Ray
Train worker; tests build one directly (world size 1, no cluster). The runner talks
to the outside through three callables only: a :class:`MetricsLogger` (TensorBoard
on rank 0), ``report(metrics, checkpoint_dir)`` (``ray.train.report`` under Ray) and
``emit(kind, payload)`` (progress events for the driver's console).

Hot path: one optimizer step makes no host synchronisation. Train metrics are summed
on the device and read (one sync) every ``log_every`` steps; validation, sampling
and checkpoints happen at their own cadence.
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

from difflm.data import PreparedData, iterate_train_batches
from difflm.evaluation import (
    RATE_MAX,
    RATE_MIN,
    ValDraws,
    counted_positions,
    draws_path,
    save_val_draws,
    val_batches_per_worker,
    val_count,
    val_pass,
    val_shard,
)
from difflm.families.base import Diagnostics
from difflm.sampling.diagnostics import sample_diagnostics
from orchestrator.train.engine import Engine
from orchestrator.train.metrics import MetricsLogger, NullLogger
from orchestrator.spec.run import RunSpec
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
        val_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.val_dir = val_dir
        self.data = data
        self.engine = engine
        self.ctx = ctx
        self.logger = logger or NullLogger()
        self.report = report
        self.emit = emit
        self.step = 0
        self.best_val_nll = math.inf
        self.best_val_nll_se = math.nan
        self.last_val: dict[str, float] = {}
        t = spec.train
        self._batches = self._train_batches(0)
        self._gen = torch.Generator(device=ctx.device).manual_seed(t.seed * 1_000_003 + ctx.rank)
        # Which positions count (never BOS, never the packer's block-final EOS): the same rule as validation.
        self._valid = counted_positions(
            torch.zeros(t.micro_batch_size, spec.data.seq_len, dtype=torch.long, device=ctx.device)
        )  # (B, L) bool
        self.last_draws: ValDraws | None = None
        self.tokens_per_step = t.micro_batch_size * t.grad_accum * ctx.world_size * spec.data.seq_len
        self._acc: dict[str, Tensor] = {}
        self._acc_steps = 0

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

    def train_step(self) -> None:
        """One optimizer step (grad_accum micro-batches); metrics stay on the device."""
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
        return out

    # ------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """val/nll (NELBO, or exact NLL for ar) ± val/nll_se over the val split, by :func:`difflm.evaluation.val_pass`.

        Each worker scores its contiguous shard of the (capped) split; the per-sequence draws are
        gathered in index order, so every rank holds the whole (N, K) result and the same metrics.
        ``self.last_draws`` keeps it (rank 0 saves it at eval points)."""
        self.engine.train(False)
        t = self.spec.train
        num = val_count(len(self.data.val), t.eval_batches, t.micro_batch_size)
        if num == 0:
            raise RuntimeError("validation saw no tokens: the val split is empty")
        lo, hi = val_shard(num, self.ctx.rank, self.ctx.world_size)
        mine = val_pass(
            self.engine.module, self.data.val, lo, hi,
            batch_size=t.micro_batch_size, samples=t.eval_samples, seed=t.eval_seed, device=self.ctx.device,
            num_batches=val_batches_per_worker(num, t.micro_batch_size, self.ctx.world_size),
        )
        draws = self._gather_draws(mine, num)
        draws.meta = {"seed": t.eval_seed, "samples": t.eval_samples, "family": self.spec.model.family,
                      "step": self.step, "rate_min": RATE_MIN, "rate_max": RATE_MAX}
        self.last_draws = draws
        self.engine.train(True)
        return draws.metrics()

    def _gather_draws(self, mine: ValDraws, num: int) -> ValDraws:
        """Every worker's shard, in rank (= index) order, on every rank: one all_gather of padded tensors."""
        world = self.ctx.world_size
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return mine
        k = mine.samples
        bounds = [val_shard(num, r, world) for r in range(world)]
        width = max(hi - lo for lo, hi in bounds)
        dev = self.ctx.device  # NCCL gathers device tensors; gloo CPU ones (MPS never runs multi-worker)
        packed = torch.zeros(width, k + 1, dtype=torch.float64, device=dev)  # (W, K+1): sums | count
        packed[: len(mine.indices), :k] = torch.from_numpy(mine.sums)
        packed[: len(mine.indices), k] = torch.from_numpy(mine.counts)
        parts = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(parts, packed)
        shards = []
        for (lo, hi), part in zip(bounds, parts):
            rows = part[: hi - lo].cpu().numpy()
            shards.append(ValDraws(indices=np.arange(lo, hi), sums=rows[:, :k], counts=rows[:, k]))
        return ValDraws.concat(shards)

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
        trainer_state = {"step": self.step, "best_val_nll": self.best_val_nll,
                         "best_val_nll_se": self.best_val_nll_se, "val": self.last_val}
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
        self.best_val_nll_se = float(state.get("best_val_nll_se", math.nan))
        self.last_val = state.get("val", {})
        # Continue the data stream where the checkpointed run left it, not from its start.
        self._batches = self._train_batches(self.step * self.spec.train.grad_accum)

    # ------------------------------------------------------------------- loop
    def _eval_point(self, checkpoint: bool) -> dict[str, float]:
        val = self.validate()
        self.last_val = val
        if val["val/nll"] < self.best_val_nll:
            self.best_val_nll, self.best_val_nll_se = val["val/nll"], val.get("val/nll_se", math.nan)
        metrics = {**val, "val/best_nll": self.best_val_nll, "step": float(self.step)}
        if self.ctx.rank == 0 and self.val_dir is not None and self.last_draws is not None:
            # per-sequence draws: `difflm results` computes paired errors between trials from them
            save_val_draws(draws_path(self.val_dir, self.step), self.last_draws)
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
                    self.emit("progress", {"step": self.step, "max_steps": t.max_steps, **metrics})
            final = self.step == t.max_steps
            if self.step % t.eval_every == 0 or final:
                self._eval_point(checkpoint=final or self.step % t.checkpoint_every == 0)
        self.logger.close()
        return {
            "steps": self.step,
            "best_val_nll": self.best_val_nll,
            "best_val_nll_se": self.best_val_nll_se,
            "final_val": self.last_val,
            "wall_time_s": time.perf_counter() - start,
            "tokens_per_step": self.tokens_per_step,
        }
