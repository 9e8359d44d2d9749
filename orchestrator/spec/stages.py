"""Staged training: a run spec's ``stages:`` list, resolved into one run spec per stage.

One journal's fix for a model that never learned was to start simple and add components one
stage at a time (stage 0 plain mdlm, stage 1 plus the importance estimator, stage 2 plus adaptive
masking). A stage is ``{name, steps, set}`` where ``set`` holds dotted overrides like ``--set``;
stages are **cumulative** (stage k is stage k-1 plus its own ``set``) and run back to back in one
``difflm train``, the global step continuing.

What a stage may change (everything else is one model, one data stream, one job):

* the family's switches (``FamilySpec.switches``: mdlm's ``diffusion.atat.*`` and
  ``diffusion.likelihood_weight``), except the importance head's size, fixed at build time;
* the LR schedule of the stage: ``train.lr``, ``warmup_steps``, ``lr_schedule``, ``min_lr_ratio``,
  ``lr_phases``. Each stage runs its own schedule over its own steps (warmup restarts).

What carries over: the weights (always), AdamW's moments (one optimizer for the whole run) and the
data stream. The stage of a step is a function of the step, so a resumed run continues in the
right stage and the right phase of its LR schedule and curriculum with no extra state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, Field, field_validator

from difflm._config import StrictModel
from difflm.families.config import DiffusionConfig
from orchestrator.spec.yamlio import set_path

if TYPE_CHECKING:
    from orchestrator.spec.run import RunSpec

#: train fields a stage may set (its LR schedule)
STAGE_TRAIN_KEYS = ("lr", "warmup_steps", "lr_schedule", "min_lr_ratio", "lr_phases")
#: build-time fields under a switch that no stage may change (they size parameters)
BUILD_TIME_KEYS = ("diffusion.atat.head_width", "diffusion.atat.head_layers", "diffusion.atat.head_heads")


class StageConfig(StrictModel):
    """One training stage: how many steps, and what it switches relative to the previous stage."""

    name: str | None = Field(None, description="Label in logs and checkpoints; default stage<index>.")
    steps: int = Field(..., ge=1, description="Optimizer steps of this stage (train.max_steps is their sum).")
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted overrides applied on top of the previous stage, e.g. "
        "{diffusion.atat.importance_head: true, train.lr: 1.0e-4}. Allowed: the family's switches "
        "(mdlm: diffusion.atat.*, diffusion.likelihood_weight) and train.lr, warmup_steps, lr_schedule, "
        "min_lr_ratio, lr_phases.",
    )

    @field_validator("set")
    @classmethod
    def _flat(cls, v: dict[str, Any]) -> dict[str, Any]:
        return flatten(v)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2}, so a nested value merges instead of replacing a section."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _is_section(field: str) -> bool:
    """Is ``diffusion.<field>`` a sub-config (e.g. atat) rather than a value?"""
    info = DiffusionConfig.model_fields.get(field)
    return info is not None and isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)


def check_stage_key(key: str, switches: tuple[str, ...], family: str) -> None:
    """ValueError unless a stage may set ``key`` (see the module docstring)."""
    parts = key.split(".")
    allowed_switch = parts[0] == "diffusion" and len(parts) >= 2 and parts[1] in switches
    allowed_train = parts[0] == "train" and len(parts) == 2 and parts[1] in STAGE_TRAIN_KEYS
    if key in BUILD_TIME_KEYS:
        raise ValueError(f"{key} sizes the importance head, which every stage shares; set it outside stages:")
    if not (allowed_switch or allowed_train):
        keys = [f"diffusion.{s}" + (".*" if _is_section(s) else "") for s in switches]
        keys += [f"train.{k}" for k in STAGE_TRAIN_KEYS]
        raise ValueError(
            f"{key} cannot change between stages (one model, one data stream); a stage of family {family!r} may "
            f"set only: {', '.join(keys)}"
        )


@dataclass(frozen=True)
class Stage:
    """A resolved stage: global steps [start, end) and the full run spec it trains with."""

    index: int
    name: str
    start: int
    end: int
    spec: RunSpec

    @property
    def steps(self) -> int:
        return self.end - self.start

    def progress(self, step: int) -> float:
        """Share of this stage done before global step ``step`` (0 at its first step), in [0, 1]."""
        return min(1.0, max(0.0, (step - self.start) / self.steps))


def resolve_stages(
    base: dict[str, Any], stages: list[StageConfig], switches: tuple[str, ...], family: str,
    validate: Callable[[dict[str, Any]], RunSpec],
) -> list[Stage]:
    """Cumulative stage specs from the base spec (a dict without ``stages``); ValueError naming the stage."""
    out: list[Stage] = []
    raw = {k: v for k, v in base.items() if k != "stages"}
    start = 0
    for i, stage in enumerate(stages):
        label = f"stages[{i}]" + (f" ({stage.name})" if stage.name else "")
        for key, value in stage.set.items():
            try:
                check_stage_key(key, switches, family)
                set_path(raw, key.split("."), value, label=f"{label}.set")
            except Exception as exc:  # SpecError from set_path, ValueError from the key check
                raise ValueError(f"{label}.set: {exc}") from None
        raw.setdefault("train", {})["max_steps"] = stage.steps
        try:
            spec = validate(raw)
        except Exception as exc:
            raise ValueError(f"{label}: {exc}") from None
        out.append(Stage(i, stage.name or f"stage{i}", start, start + stage.steps, spec))
        start += stage.steps
    return out


def stage_at(plan: list[Stage], step: int) -> Stage:
    """The stage that runs optimizer step ``step`` (0-based; past the end: the last stage)."""
    for stage in plan:
        if step < stage.end:
            return stage
    return plan[-1]
