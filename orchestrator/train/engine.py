"""Training engines: DeepSpeed where it runs, plain PyTorch otherwise (Apple MPS, or by choice).

Both expose the same small surface, so :class:`orchestrator.train.runner.Runner` never
branches on the backend:

    out = engine.forward(tokens, valid)      # LossOutput
    engine.backward(out.loss)                # loss scaled by 1/grad_accum inside
    engine.step()                            # every micro-batch; updates at the accumulation boundary
    engine.lr, engine.grad_norm()            # read at log points only
    engine.save(dir) / engine.load(dir)      # optimizer + scheduler + weights

DeepSpeed, like the torch engine here, scales the loss by 1/grad_accum and steps the
LR scheduler once per optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from difflm.families.base import Family, LossOutput
from orchestrator.spec.run import RunSpec, TrainConfig


def _cosine(train: TrainConfig, start: int, step: int) -> float:
    """Cosine from 1 at ``start`` down to min_lr_ratio at max_steps."""
    span = max(1, train.max_steps - start)
    progress = min(1.0, max(0.0, (step - start) / span))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step ``s``: linear warmup, then cosine or constant;
    or ``phases``: warmup until lr_phases[0] of max_steps, constant until lr_phases[1], then cosine."""

    if train.lr_schedule == "phases":
        lo, hi = train.lr_phases or (0.3, 0.7)
        warm, decay = round(lo * train.max_steps), round(hi * train.max_steps)

        def phases(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 1.0 if step < decay else _cosine(train, decay, step)

        return phases

    def f(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        return _cosine(train, train.warmup_steps, step)

    return f


def run_lr_lambda(spec: RunSpec) -> Callable[[int], float]:
    """The LR multiplier over the whole run's optimizer steps: ``lr_lambda`` of each stage over its own
    steps (warmup restarts at a stage start), scaled by the stage's lr over the run's base lr.

    A pure function of the step: the scheduler's checkpointed step count is all a resume needs."""
    plan = spec.stage_plan()
    if len(plan) == 1:
        return lr_lambda(spec.train)
    base = spec.train.lr
    parts = [(st.start, st.end, st.spec.train.lr / base, lr_lambda(st.spec.train)) for st in plan]

    def f(step: int) -> float:
        for start, end, scale, fn in parts:
            if step < end:
                return scale * fn(step - start)
        start, end, scale, fn = parts[-1]
        return scale * fn(step - start)

    return f


def make_optimizer(
    model: torch.nn.Module, train: TrainConfig, lr_fn: Callable[[int], float] | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with decay on matrices only, and the LambdaLR schedule (``lr_fn``, default ``lr_lambda(train)``)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn or lr_lambda(train))
    return opt, sched


class Engine(Protocol):
    module: Family
    backend: str

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput: ...
    def backward(self, loss: Tensor) -> None: ...
    def step(self) -> None: ...
    @property
    def lr(self) -> float: ...
    def grad_norm(self) -> float | None: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...
    def train(self, mode: bool = True) -> None: ...


class TorchEngine:
    """Plain PyTorch: AdamW, grad accumulation, clipping, autocast for bf16/fp16."""

    backend = "torch"

    def __init__(
        self, model: Family, train: TrainConfig, device: torch.device, lr_fn: Callable[[int], float] | None = None
    ) -> None:
        self.module = model.to(device)
        self.device = device
        self.accum = train.grad_accum
        self.clip = train.grad_clip
        self.optimizer, self.scheduler = make_optimizer(self.module, train, lr_fn)
        self._micro = 0
        self._last_norm: Tensor | None = None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
        self._autocast = (
            (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        )
        self._scaler = torch.amp.GradScaler(device.type) if train.precision == "fp16" else None

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        with self._autocast():
            return self.module(tokens, valid, generator)

    def backward(self, loss: Tensor) -> None:
        loss = loss / self.accum
        (self._scaler.scale(loss) if self._scaler else loss).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.accum:
            return
        if self._scaler:
            self._scaler.unscale_(self.optimizer)
        # Returned as a tensor: no host sync here; read at log points.
        self._last_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        if self._scaler:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> float | None:
        return None if self._last_norm is None else float(self._last_norm)

    def save(self, directory: Path) -> None:
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "micro": self._micro},
            directory / "engine_state.pt",
        )

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.module.load_state_dict(load_file(str(directory / "model.safetensors"), device=str(self.device)))
        state = torch.load(directory / "engine_state.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]


def deepspeed_config(spec: RunSpec) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the spec (also saved with checkpoints)."""
    t = spec.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": spec.scaling.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the family; ZeRO 0-3, bf16/fp16, clipping, accumulation."""

    backend = "deepspeed"

    def __init__(self, model: Family, spec: RunSpec, device: torch.device) -> None:
        import deepspeed  # only here: difflm/ never imports it, and the CLI starts fast

        model = model.to(device)
        opt, sched = make_optimizer(model, spec.train, run_lr_lambda(spec))
        self.config = deepspeed_config(spec)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=self.config
        )
        self.module: Family = self.engine.module
        self.device = device

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        return self.engine(tokens, valid, generator)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path) -> None:
        # Collective: every rank writes its ZeRO partition under directory/deepspeed.
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state")
        if self.engine.global_rank == 0:
            (directory / "deepspeed_config.json").write_text(json.dumps(self.config, indent=2))

    def load(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")

    def full_state_dict(self) -> dict[str, Tensor]:
        """Whole fp32/bf16 weights on every rank (gathers ZeRO-3 partitions; collective)."""
        if self.config["zero_optimization"]["stage"] == 3:
            import deepspeed

            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
        return self.engine.module.state_dict()


def build_engine(model: Family, spec: RunSpec, device: torch.device) -> Engine:
    """DeepSpeed when asked for and possible; plain torch on MPS (DeepSpeed has no MPS accelerator)."""
    if spec.scaling.deepspeed and device.type != "mps":
        return DeepSpeedEngine(model, spec, device)
    return TorchEngine(model, spec.train, device, run_lr_lambda(spec))
