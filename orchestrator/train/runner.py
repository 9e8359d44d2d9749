"""The per-worker training loop, independent of Ray: train_step / validate / save / load.

``orchestrator.train.launch.train_fn_per_worker`` builds a :class:`Runner` inside each Ray
Train worker; tests build one directly (world size 1, no cluster). The runner talks
to the outside through three callables only: a :class:`MetricsLogger` (TensorBoard
on rank 0), ``report(metrics, checkpoint_dir)`` (``ray.train.report`` under Ray) and
``emit(kind, payload)`` (progress events for the driver's console).

Hot path: one optimizer step makes no host synchronisation. Train metrics are summed
on the device and read (one sync) every ``log_every`` steps; validation, sampling
and checkpoints happen at their own cadence.

Non-finite steps: the engine skips the update on the device (see orchestrator.engine) and
leaves a 0/1 flag; the runner counts skipped steps and the current run of them on the
device, and reads the counts at log points. ``train.max_nonfinite`` skipped steps in a row
stop the run with :class:`TrainingStopped` ("non-finite loss at step N"), noticed at the next
log point (no update reached the weights meanwhile); so does a non-finite val/nll.

Resume: :meth:`save` / :meth:`load` carry everything the next step depends on (weights,
optimizer, LR schedule, EMA, step, data position, every generator, skipped-step counters), so a
resumed run's losses equal the uninterrupted run's from the checkpoint on.

Stages (``spec.stages``, ``orchestrator/spec/stages.py``): before every step the runner looks
up the stage of the step, applies its switches when it changes (``Family.configure``) and tells
the family how far into the stage it is (``Family.set_progress``, the ATAT curriculum). Every
stage ends with a val point and a checkpoint; ``trainer_state.json`` names the stage. The LR
schedule is the engine's (``optim.run_lr_lambda``). All of it is a function of the step, so
``load`` restores the stage, the curriculum phase and the LR phase from the step alone.
"""

from __future__ import annotations

import contextlib
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

from difflm.atomic import atomic_path, atomic_write_text
from orchestrator.devices import host_to_device
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
from difflm.types import Diagnoser, Diagnostics, ValTuner, ValTuning
from difflm.sampling.diagnostics import sample_diagnostics
from orchestrator.errors import TrainingStopped
from orchestrator.rundir.ckpt_files import TRAINER_STATE, WEIGHTS, write_manifest
from orchestrator.train.ema import EMA, EMA_FILE, rank_file
from orchestrator.train.engine import Engine, load_tensors
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
        self._acc_count = torch.zeros((), device=ctx.device)  # finite micro-batches summed into _acc
        # Non-finite bookkeeping, on the device (float32 counts are exact far beyond any run length).
        self._skipped = torch.zeros((), device=ctx.device)  # steps whose update was skipped, all run
        self._streak = torch.zeros((), device=ctx.device)  # skipped steps in a row, up to now
        self._stop_step = torch.full((), -1.0, device=ctx.device)  # step where the streak reached the limit
        self._stop_at = -1  # _stop_step as read at the last log point
        self.ema: EMA | None = None
        if t.ema:
            targets, partitioned = engine.ema_targets()
            self.ema = EMA(targets, t.ema, partitioned=partitioned, after_swap=engine.after_weight_swap)
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
        return host_to_device(batch, self.ctx.device)  # (B, L) int64; CUDA: pinned, non-blocking

    def _enter_stage(self, stage: Stage) -> None:
        """Apply ``stage``'s switches to the family (weights, optimizer and data stream carry over)."""
        self.engine.module.configure(stage.spec.build_diffusion())
        self.stage = stage
        if len(self.plan) > 1 and self.ctx.rank == 0:
            self.emit("log", {"message": f"stage {stage.index} ({stage.name}): steps {stage.start}-{stage.end}"})

    def train_step(self) -> None:
        """One optimizer step (grad_accum micro-batches) in the stage of the step; metrics and non-finite
        counts stay on the device."""
        stage = stage_at(self.plan, self.step)
        if stage is not self.stage:
            self._enter_stage(stage)
        self.engine.module.set_progress(stage.progress(self.step))
        if not self.engine.module.training:  # after an eval or sampling; module.train() walks every submodule
            self.engine.train(True)  # (0.5 ms a step at tiny, 3-4% of its step: docs/benchmarks.md)
        for _ in range(self.spec.train.grad_accum):
            tokens = self._to_device(next(self._batches))
            out = self.engine.forward(tokens, self._valid, self._gen)
            self.engine.backward(out.loss)
            self.engine.step()
            finite = torch.isfinite(out.loss.detach())
            parts = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.metrics.items()}}
            for key, val in parts.items():
                val = torch.where(finite, val.float(), 0.0)  # a skipped micro-batch must not turn the mean to NaN
                self._acc[key] = self._acc[key] + val if key in self._acc else val
            self._acc_count = self._acc_count + finite.float()
            self._hist = out.histograms
        self.step += 1
        skipped = self.engine.last_skipped
        if skipped is not None:
            self._skipped = self._skipped + skipped
            self._streak = (self._streak + 1.0) * skipped  # back to 0 on a good step
            reached = (self._streak >= self.spec.train.max_nonfinite) & (self._stop_step < 0)
            self._stop_step = torch.where(reached, float(self.step), self._stop_step)
        if self.ema is not None:
            self.ema.update(skipped)

    def _gather_train_metrics(self, elapsed: float, steps: int) -> dict[str, float]:
        """One host sync: averages since the last log point, LR, grad norm, throughput, skipped steps."""
        names = sorted(self._acc)
        sums = torch.stack([*(self._acc[n] for n in names), self._acc_count])
        sums = _all_reduce_sum(sums, self.ctx.world_size)
        # one host read for both (a CUDA sync each): the counters are identical on every rank, not reduced
        *totals, count, skipped, stop_step = torch.cat([sums, torch.stack([self._skipped, self._stop_step])]).tolist()
        counters = [skipped, stop_step]
        self._acc, self._acc_count = {}, torch.zeros_like(self._acc_count)
        out = {f"train/{n}": (v / count if count else math.nan) for n, v in zip(names, totals)}
        out["train/lr"] = self.engine.lr
        norm = self.engine.grad_norm()
        if norm is not None:
            out["train/grad_norm"] = norm
        out["train/tokens_per_sec"] = steps * self.tokens_per_step / max(elapsed, 1e-9)
        out["train/skipped_steps"] = counters[0]
        self._stop_at = int(counters[1])
        if len(self.plan) > 1 and self.stage is not None:
            out["train/stage"] = float(self.stage.index)
        for name, values in self._hist.items():  # this rank's last micro-batch: a snapshot, not an average
            q = torch.quantile(values.detach().float().cpu(), torch.tensor([0.1, 0.5, 0.9])).tolist()
            out.update({f"train/{name}_p10": q[0], f"train/{name}_p50": q[1], f"train/{name}_p90": q[2]})
        return out

    def _check_stop(self) -> None:
        if self._stop_at >= 0:
            k = self.spec.train.max_nonfinite
            raise TrainingStopped(
                f"non-finite loss at step {self._stop_at} ({k} steps in a row skipped, none reached the weights); "
                "lower train.lr, raise train.warmup_steps, use fp32, or check the data"
            )

    def _log_histograms(self) -> None:
        """The latest per-token distributions (e.g. ATAT importance) as TensorBoard histograms (rank 0)."""
        for name, values in self._hist.items():
            self.logger.log_histogram(f"train/{name}", values.detach().float().cpu(), self.step)

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
        ids = self.engine.module.sample(n, self.spec.data.seq_len, self.spec.diffusion.steps_for(self.spec.data.seq_len), gen)
        self.engine.train(True)
        return [self.data.tokenizer.decode(row.tolist()) for row in ids.cpu()]

    @torch.no_grad()
    def diagnostics(self) -> Diagnostics:
        """The family's extra val metrics on the first val batch, fixed seed; none when the family has no
        diagnostics hook (:class:`difflm.types.Diagnoser`: optional)."""
        if len(self.data.val) == 0 or not isinstance(self.engine.module, Diagnoser):
            return Diagnostics()
        self.engine.train(False)
        gen = torch.Generator(device=self.ctx.device).manual_seed(self.spec.train.eval_seed)
        tokens = self._to_device(np.asarray(self.data.val[: self.spec.train.micro_batch_size], dtype=np.int64))
        diag = self.engine.module.diagnostics(tokens, gen, self.data.tokenizer.decode)
        self.engine.train(True)
        return diag

    @torch.no_grad()
    def val_tune(self) -> ValTuning:
        """The family's optional val-tuning hook (:class:`difflm.types.ValTuner`, bd3lm's clip search): the
        worker's first ``val_tune_batches()`` micro-batches of its val shard (every rank the same count: a
        padding batch counts nothing), a generator seeded from (eval_seed, step, rank) so a resumed run tunes
        identically, and a sum over workers so every rank picks the same setting."""
        model = self.engine.module
        if not isinstance(model, ValTuner) or model.val_tune_batches() <= 0 or len(self.data.val) == 0:
            return ValTuning()
        t = self.spec.train
        size = t.micro_batch_size
        num = val_count(len(self.data.val), t.eval_batches, size)
        lo, hi = val_shard(num, self.ctx.rank, self.ctx.world_size)
        batches = []
        for i in range(min(model.val_tune_batches(), val_batches_per_worker(num, size, self.ctx.world_size))):
            a, b = min(lo + i * size, hi), min(lo + (i + 1) * size, hi)
            tokens = self._to_device(np.asarray(self.data.val[a:b] if b > a else self.data.val[:1], dtype=np.int64))
            batches.append((tokens, counted_positions(tokens) & (b > a)))
        seed = int(np.random.SeedSequence([t.eval_seed, self.step, self.ctx.rank]).generate_state(1, np.uint64)[0])
        gen = torch.Generator(device=self.ctx.device).manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        self.engine.train(False)
        out = model.val_tune(batches, gen, lambda x: _all_reduce_sum(x, self.ctx.world_size))
        self.engine.train(True)
        return out

    # ------------------------------------------------------------ checkpoints
    def save(self, directory: Path) -> None:
        """Weights (safetensors), optimizer + scheduler, EMA, generators, loop state, spec, tokenizer.

        Collective (ZeRO partitions, ZeRO-3 gathers): every rank calls it, each with its own folder
        under Ray (merged on upload). Files every rank would write identically come from rank 0 only;
        per-rank files carry the rank in their name. Each rank ends with its manifest (ckpt_files).
        Nothing here is a pickle of Python objects: safetensors, JSON, and tensor-only ``.pt`` files.
        """
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        rank = self.ctx.rank
        self.engine.save(directory)
        rng: dict[str, Tensor] = {"generator": self._gen.get_state(), "torch": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        with atomic_path(directory / "rng" / f"rank{rank}.pt") as tmp:
            torch.save(rng, tmp)
        full = self.engine.full_state_dict()  # collective under ZeRO-3
        if rank == 0:  # before the EMA is swapped in: `full` may share storage with the live weights
            with atomic_path(directory / WEIGHTS) as tmp:
                save_file({k: v.detach().cpu().contiguous().clone() for k, v in full.items()}, str(tmp))
        del full
        ema_full: dict[str, Tensor] | None = None
        if self.ema is not None:
            if self.ema.partitioned:
                with atomic_path(directory / rank_file(rank)) as tmp:
                    save_file(self.ema.state_tensors(), str(tmp))
            with self.ema.swapped_in():
                ema_full = {k: v.detach().cpu().contiguous().clone() for k, v in self.engine.full_state_dict().items()}
        if rank == 0:
            if ema_full is not None:
                with atomic_path(directory / EMA_FILE) as tmp:
                    save_file(ema_full, str(tmp))
            atomic_write_text(directory / "spec.yaml", spec_yaml(self.spec))
            self.data.tokenizer.save(directory / "tokenizer")
            skipped, streak = torch.stack([self._skipped, self._streak]).tolist()
            trainer_state: dict[str, Any] = {
                "step": self.step,
                "best_val_nll": self.best_val_nll,
                "best_val_nll_se": self.best_val_nll_se,
                "val": self.last_val,
                "world_size": self.ctx.world_size,
                "skipped_steps": int(skipped),
                "nonfinite_streak": int(streak),
                "ema_updates": self.ema.updates if self.ema is not None else None,
            }
            if len(self.plan) > 1:  # informational: a resume derives the stage from the step
                done = stage_at(self.plan, max(self.step - 1, 0))
                trainer_state["stage"] = {"index": done.index, "name": done.name, "start": done.start, "end": done.end}
            atomic_write_text(directory / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        write_manifest(directory, rank, self.ctx.world_size, self.step)

    def load(self, directory: Path) -> None:
        """Restore everything :meth:`save` wrote (call :func:`ckpt_files.verify_checkpoint` first)."""
        from safetensors.torch import load_file

        self.engine.load(directory)
        state = json.loads((directory / TRAINER_STATE).read_text())
        saved_world = int(state.get("world_size", self.ctx.world_size))
        rng = directory / "rng" / f"rank{self.ctx.rank}.pt"
        if rng.exists() and saved_world == self.ctx.world_size:
            saved = load_tensors(rng)
            saved = saved if isinstance(saved, dict) else {"generator": saved}  # before torch/cuda states were kept
            self._gen.set_state(saved["generator"])
            if "torch" in saved:
                torch.set_rng_state(saved["torch"])
            if "cuda" in saved and self.ctx.device.type == "cuda":
                torch.cuda.set_rng_state(saved["cuda"], self.ctx.device)
        self.step = int(state["step"])
        self.best_val_nll = float(state["best_val_nll"])
        self.best_val_nll_se = float(state.get("best_val_nll_se", math.nan))
        self.last_val = state.get("val", {})
        dev = self.ctx.device
        self._skipped = torch.tensor(float(state.get("skipped_steps", 0)), device=dev)
        self._streak = torch.tensor(float(state.get("nonfinite_streak", 0)), device=dev)
        self._stop_step = torch.full((), -1.0, device=dev)
        if self.ema is not None:
            source = directory / (rank_file(self.ctx.rank) if self.ema.partitioned else EMA_FILE)
            if source.is_file():
                self.ema.load_tensors(load_file(str(source)), source)
                self.ema.updates = int(state.get("ema_updates") or 0)
            else:  # EMA switched on for a run that had none: start it from the restored weights
                targets, partitioned = self.engine.ema_targets()
                self.ema = EMA(targets, self.ema.decay, partitioned=partitioned, after_swap=self.engine.after_weight_swap)
        # Continue the data stream where the checkpointed run left it, not from its start.
        self._batches = self._train_batches(self.step * self.spec.train.grad_accum)

    # ------------------------------------------------------------------- loop
    def _eval_point(self, checkpoint: bool) -> dict[str, float]:
        # Validation, samples and diagnostics see the EMA weights when there is one.
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            val = self.validate()
            if not math.isfinite(val["val/nll"]):
                raise TrainingStopped(
                    f"non-finite val/nll ({val['val/nll']}) at step {self.step}; the weights (or their EMA) hold "
                    "inf/nan or overflow in the forward pass; lower train.lr or use fp32"
                )
            # Samples of the untrained model are noise, and cost sample_steps forwards before the first step.
            texts = self.sample_texts() if self.step > 0 else []
            diag = self.diagnostics()
            tuned = self.val_tune() if self.step > 0 else ValTuning()  # e.g. bd3lm's clip search (BD3-LMs skip step 0)
        val = {**val, **{f"val/{k}": v for k, v in tuned.metrics.items()}}
        self.last_val = val
        if val["val/nll"] < self.best_val_nll:
            self.best_val_nll, self.best_val_nll_se = val["val/nll"], val.get("val/nll_se", math.nan)
        metrics = {**val, "val/best_nll": self.best_val_nll, "step": float(self.step)}
        if self.ctx.rank == 0 and self.val_dir is not None and self.last_draws is not None:
            # per-sequence draws: `difflm results` computes paired errors between trials from them
            save_val_draws(draws_path(self.val_dir, self.step), self.last_draws)
        if self.ctx.rank == 0:
            self.logger.log_scalars({**val, **{f"val/{k}": v for k, v in {**diag.scalars, **tuned.scalars}.items()}},
                                    self.step)
            if tuned.message:
                self.emit("log", {"message": f"step {self.step}: {tuned.message}"})
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
            exact = bool(getattr(self.engine.module, "exact_likelihood", False))  # the console: "ppl" or "ppl<="
            self.emit("eval", {**metrics, "samples": texts[:2], "exact_likelihood": exact})
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
        if self.step == 0 and t.eval_at_start is not False:
            self._eval_point(checkpoint=False)  # the step-0 reference value
        elif self.step >= t.max_steps:
            # Resumed from a checkpoint at the end: the run finished before an interruption took effect
            # (Ctrl-C of a sweep stops Tune before its last reports land). Report the end again, with a
            # checkpoint so Ray registers it and the links point at it: a trial without any result
            # would rank as failed.
            self._eval_point(checkpoint=True)
        last_log_time, last_log_step = time.perf_counter(), self.step
        start = time.perf_counter()
        while self.step < t.max_steps:
            self.train_step()
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                now = time.perf_counter()
                metrics = self._gather_train_metrics(now - last_log_time, self.step - last_log_step)
                last_log_time, last_log_step = now, self.step
                if self.ctx.rank == 0:
                    self.logger.log_scalars(metrics, self.step)
                    self._log_histograms()
                    self.emit("progress", {"step": self.step, "max_steps": t.max_steps, **metrics})
                self._check_stop()
            # Every stage ends with a val point and a checkpoint, so each stage's result is kept.
            stage_end = self.stage is not None and self.step == self.stage.end and len(self.plan) > 1
            final = self.step == t.max_steps
            if self.step % t.eval_every == 0 or final or stage_end:
                self._eval_point(checkpoint=final or stage_end or self.step % t.checkpoint_every == 0)
        self.logger.close()
        return {
            "steps": self.step,
            "best_val_nll": self.best_val_nll,
            "best_val_nll_se": self.best_val_nll_se,
            "final_val": self.last_val,
            "wall_time_s": time.perf_counter() - start,
            "tokens_per_step": self.tokens_per_step,
            "skipped_steps": int(self._skipped.item()),
        }
