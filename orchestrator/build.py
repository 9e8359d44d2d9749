"""One construction path: what a run trains, built from its spec.

The worker, checkpoint loading, ``difflm doctor``, ``difflm bench throughput`` and ``difflm bench grid``
all build through here, so they cannot drift apart again: before this module, the benches built the
model from ``spec.diffusion`` directly (a staged ATAT spec got no importance head) and the grid bench
gave its engine no LR lambda (a constant LR instead of the run's schedule).

* :func:`build_family`: the family model as a run builds it: seeded with ``train.seed``, from
  :meth:`RunSpec.build_diffusion` (the family's defaults filled in, the ATAT importance head included
  when any stage turns it on), so one set of weights serves every stage.
* :func:`build_run`: that model, its engine (DeepSpeed or plain torch) with the run's LR multiplier
  (:func:`~orchestrator.train.optim.run_lr_lambda`: each stage's schedule over its own steps) and,
  given a worker context, the :class:`~orchestrator.train.runner.Runner` that trains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from difflm.families import Family, build_model
from orchestrator.spec.run import RunSpec
from orchestrator.train.engine import DeepSpeedEngine, Engine, TorchEngine
from orchestrator.train.optim import run_lr_lambda
from orchestrator.train.runner import Runner, WorkerContext


def special_ids(tok: Any) -> dict[str, int]:
    """The tokenizer's bos/eos/pad ids as build_model keywords (as the trainer passes them)."""
    return {k: getattr(tok, k) for k in ("bos_id", "eos_id", "pad_id") if getattr(tok, k, None) is not None}


def build_family(spec: RunSpec, tokenizer: Any) -> Family:
    """The run's family model, seeded like a run (``torch.manual_seed(train.seed)`` right before), on the CPU.

    Built from :meth:`RunSpec.build_diffusion`, so a staged spec's model has every module any stage
    switches on; the stage's own switches are applied by the runner (``Family.configure``)."""
    torch.manual_seed(spec.train.seed)
    return build_model(spec.model, spec.build_diffusion(), tokenizer.vocab_size, **special_ids(tokenizer))


@dataclass
class BuiltRun:
    """What a run trains: the model, its engine, the LR multiplier the engine steps with, and the runner
    (None when no worker context was given, e.g. a bench that drives the engine itself)."""

    model: Family
    engine: Engine
    lr_lambda: Callable[[int], float]
    runner: Runner | None


def build_engine(model: Family, spec: RunSpec, device: torch.device,
                 backend: Literal["auto", "torch", "deepspeed"] = "auto") -> Engine:
    """The engine for ``model``: auto = DeepSpeed when the spec asks for it and the device has it (not MPS),
    else plain torch; either way with the run's LR multiplier."""
    if backend == "deepspeed" or (backend == "auto" and spec.scaling.deepspeed and device.type != "mps"):
        return DeepSpeedEngine(model, spec, device)  # run_lr_lambda(spec) inside
    return TorchEngine(model, spec.train, device, run_lr_lambda(spec))


def build_run(
    spec: RunSpec,
    data: Any,
    device: torch.device,
    *,
    ctx: WorkerContext | None = None,
    backend: Literal["auto", "torch", "deepspeed"] = "auto",
    runner_cls: type[Runner] = Runner,
    model_hook: Callable[[Family], Family] | None = None,
    **runner_kwargs: Any,
) -> BuiltRun:
    """Model, engine, LR lambda and (with ``ctx``) runner for ``spec`` on ``device``.

    ``model_hook`` sees the model between building and wrapping (the worker logs its size there);
    ``runner_cls`` / ``runner_kwargs`` are the runner's (the worker's stamped subclass, its logger, ...)."""
    model = build_family(spec, data.tokenizer)
    if model_hook is not None:
        model = model_hook(model)
    engine = build_engine(model, spec, device, backend)
    runner = runner_cls(spec, data, engine, ctx, **runner_kwargs) if ctx is not None else None
    return BuiltRun(model=model, engine=engine, lr_lambda=run_lr_lambda(spec), runner=runner)
