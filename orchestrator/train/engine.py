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
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from difflm.families.base import Family, LossOutput
from orchestrator.spec.run import RunSpec, TrainConfig


def lr_lambda(train: TrainConfig):
    """Multiplier of the peak LR at optimizer step ``s``: linear warmup, then cosine or constant."""

    def f(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        span = max(1, train.max_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over all tensors) where the device has the kernel, else foreach.

    Measured on a 2-core CPU, 8.3M parameters: clip + step 10 ms fused, 26 ms foreach, 37 ms with
    the per-tensor loop torch picks by default on a CPU (see docs/benchmarks.md)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # no fused kernel for these tensors' device or dtype
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with decay on matrices only, and the LambdaLR schedule."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = adamw(groups, lr=train.lr, betas=train.adam_betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
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

    def __init__(self, model: Family, train: TrainConfig, device: torch.device) -> None:
        self.module = model.to(device)
        self.device = device
        self.accum = train.grad_accum
        self.clip = train.grad_clip
        self.optimizer, self.scheduler = make_optimizer(self.module, train)
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


def effective_zero_stage(spec: RunSpec) -> int:
    """``scaling.zero_stage``, or 0 for a single worker.

    ZeRO partitions optimizer state, gradients (stage 2) and parameters (stage 3) across data-parallel
    ranks; with one rank there is nothing to partition and stages 1-3 only add gradient bucketing,
    copies and collectives (one worker, 8.3M parameters, CPU: 0.949x of a bare loop at stage 2,
    0.976x at stage 0, docs/benchmarks.md)."""
    return spec.scaling.zero_stage if spec.scaling.num_workers > 1 else 0


def deepspeed_config(spec: RunSpec) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the spec (also saved with checkpoints)."""
    t = spec.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": effective_zero_stage(spec)},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _dynamo_disabled() -> Any:
    """TORCHDYNAMO_DISABLE=1 for the duration: ``deepspeed.initialize`` imports DeepSpeed's Muon module
    only to list it as a ZeRO optimizer, and that module decorates functions with ``torch.compile``
    at import, which loads torch._inductor: 2-3 s of every run's start-up on a CPU box. With dynamo
    disabled the decorators are no-ops (difflm never uses Muon); torch.compile elsewhere is unaffected."""
    old = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHDYNAMO_DISABLE", None)
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = old


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the family; ZeRO 0-3, bf16/fp16, clipping, accumulation."""

    backend = "deepspeed"

    def __init__(self, model: Family, spec: RunSpec, device: torch.device) -> None:
        import deepspeed  # only here: difflm/ never imports it, and the CLI starts fast

        model = model.to(device)
        opt, sched = make_optimizer(model, spec.train)
        self.config = deepspeed_config(spec)
        with _dynamo_disabled():
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
    return TorchEngine(model, spec.train, device)
