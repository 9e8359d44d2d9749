"""The run spec: one pydantic-validated YAML file describes a training run.

Sections map one-to-one onto components: ``model`` (difflm.models), ``diffusion``
(difflm.families), ``data`` and ``tokenizer`` (difflm.data), and the orchestrator's
own ``train``, ``scaling`` and ``output``. ``load_run_spec`` reads YAML, applies
``--set dotted.key=value`` overrides and revalidates; every failure becomes a
:class:`~orchestrator.errors.SpecError` naming the file, field path and allowed values.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from difflm._config import StrictModel
from difflm.data.config import DataConfig, TokenizerConfig
from difflm.families.config import DiffusionConfig
from difflm.families.registry import family_names, get_family
from difflm.models.config import ModelConfig
from orchestrator.errors import SpecError
from orchestrator.spec.yamlio import apply_overrides, deep_merge, read_yaml, validate_as


class TrainConfig(StrictModel):
    """Optimisation and the loop's cadence."""

    max_steps: int = Field(1000, ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(3e-4, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps from 0 to lr.")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="After warmup: cosine decay to min_lr_ratio * lr at max_steps, or constant."
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final LR of the cosine schedule, as a share of lr.")
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient clipping by global norm.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision. fp16 needs CUDA; bf16 works on CUDA and CPU."
    )
    eval_every: int = Field(100, ge=1, description="Validate (and log text samples) every this many steps.")
    eval_batches: int | None = Field(
        None, ge=1, description="Cap on val batches per worker; null = the whole val split (comparable across runs)."
    )
    eval_seed: int = Field(1234, description="Seed of the generator that draws val times and masks.")
    checkpoint_every: int = Field(500, ge=1, description="Checkpoint every this many steps; a multiple of eval_every.")
    log_every: int = Field(10, ge=1, description="Gather train metrics (one host sync) every this many steps.")
    num_samples: int = Field(4, ge=0, le=64, description="Text samples logged to TensorBoard at each eval.")
    seed: int = Field(0, description="Seed for init, data order and training noise.")

    @model_validator(mode="after")
    def _cadence(self) -> "TrainConfig":
        if self.checkpoint_every % self.eval_every != 0:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of eval_every ({self.eval_every}), "
                "so every checkpoint carries the val NLL that ranks best/last"
            )
        return self


class ScalingConfig(StrictModel):
    """Where the run executes."""

    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (processes); one per GPU on GPU boxes.")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field(
        "auto", description="auto picks cuda, then mps, then cpu."
    )
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs Ray reserves per worker.")
    gpus_per_worker: float = Field(1.0, ge=0.0, description="GPUs Ray reserves per worker when the device is cuda.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    deepspeed: bool = Field(True, description="Wrap the model in DeepSpeed; off (or on MPS) runs plain PyTorch.")


class OutputConfig(StrictModel):
    """Where results go."""

    dir: str = Field("runs", description="Parent folder of run folders.")
    name: str | None = Field(None, description="Run folder name; default <family>-<timestamp>.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files (rank 0).")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("name must be a plain folder name (no '/', not starting with '.')")
        return v


class RunSpec(StrictModel):
    """A whole training run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Family and backbone size.")
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig, description="Noise process and loss weights.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus and packing.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Text to ids.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and cadence.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Workers, device, DeepSpeed.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Run folder and logging.")

    @model_validator(mode="after")
    def _family_and_schedule(self) -> "RunSpec":
        try:
            fam = get_family(self.model.family)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        if self.diffusion.schedule is None and fam.schedules:
            self.diffusion.schedule = fam.schedules[0]  # the family's default
        if fam.schedules and self.diffusion.schedule not in fam.schedules:
            raise ValueError(
                f"diffusion.schedule {self.diffusion.schedule!r} is not a {fam.name} schedule; "
                f"choose one of {', '.join(fam.schedules)}"
            )
        if self.model.backbone not in fam.backbones:
            raise ValueError(
                f"model.backbone {self.model.backbone!r} is not supported by {fam.name}; "
                f"choose one of {', '.join(fam.backbones)}"
            )
        if self.train.precision == "fp16" and self.scaling.device in ("cpu", "mps"):
            raise ValueError(f"train.precision fp16 needs CUDA; use bf16 or fp32 on {self.scaling.device}")
        return self

    def run_name(self) -> str:
        return self.output.name or f"{self.model.family}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


def load_run_spec(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> RunSpec:
    """Read, override and validate a run spec; raise SpecError with a user-facing message.

    ``defaults`` (a scaling profile's fields) sit under the file: defaults < file < overrides.
    """
    raw = read_yaml(path)
    if "sweep" in raw:
        raise SpecError(f"{path}: this is a sweep file (it has a `sweep:` section); run it with `difflm sweep {path}`")
    raw = deep_merge(defaults or {}, raw)
    raw = apply_overrides(raw, overrides, source=str(path))
    return validate_as(RunSpec, raw, source=str(path))


def spec_from_dict(raw: dict[str, Any], source: str = "<spec>") -> RunSpec:
    """Validate a plain dict (e.g. sent to a Ray worker or sampled by Tune)."""
    return validate_as(RunSpec, raw, source=source)


__all__ = [
    "RunSpec",
    "TrainConfig",
    "ScalingConfig",
    "OutputConfig",
    "load_run_spec",
    "spec_from_dict",
    "family_names",
]
