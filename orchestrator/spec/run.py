"""The run spec: one pydantic-validated YAML file describes a training run.

Sections map one-to-one onto components: ``model`` (difflm.models), ``diffusion``
(difflm.families), ``data`` and ``tokenizer`` (difflm.data), and the orchestrator's
own ``train``, ``scaling`` and ``output``; an optional ``stages`` list runs several
training stages in one job (``orchestrator/spec/stages.py``). ``load_run_spec`` reads YAML, applies
``--set dotted.key=value`` overrides and revalidates; every failure becomes a
:class:`~orchestrator.errors.SpecError` naming the file, field path and allowed values.
"""

from __future__ import annotations


import datetime as _dt
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic.fields import FieldInfo

from difflm._config import StrictModel
from difflm.data.config import DataConfig, TokenizerConfig
from difflm.families.config import AtatConfig, FamilyConfig
from difflm.families.registry import family_names, get_family, on_register, section_union, tag_sections
from orchestrator.errors import SpecError
from orchestrator.spec.stages import Stage, StageConfig, resolve_stages
from orchestrator.spec.yamlio import apply_overrides, deep_merge, parse_override, read_yaml, validate_as


class TrainConfig(StrictModel):
    """Optimisation and the loop's cadence."""

    max_steps: int = Field(1000, ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(
        3e-4, gt=0.0, allow_inf_nan=False,
        description="Peak learning rate (AdamW). Only positivity is checked here; `difflm doctor` tells you "
        "when a value diverges or cannot learn.",
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps from 0 to lr (not used by lr_schedule: phases).")
    lr_schedule: Literal["cosine", "constant", "phases"] = Field(
        "cosine",
        description="After warmup: cosine decay to min_lr_ratio * lr at max_steps, or constant. phases: the "
        "journal's three phases over the steps (of the stage): linear warmup until lr_phases[0], constant until "
        "lr_phases[1], then cosine to min_lr_ratio * lr.",
    )
    lr_phases: tuple[float, float] | None = Field(
        None,
        description="lr_schedule phases: the two boundaries as fractions of the steps; null = "
        "diffusion.atat.curriculum_bounds, so the LR phases line up with the ATAT curriculum.",
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final LR of the cosine schedule, as a share of lr.")
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient clipping by global norm.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training precision. auto: bf16 where it pays (a GPU with native bf16; a CPU with native bf16 "
        "instructions and d_model >= 256, or >= 128 with a vocab of >= 4096), else fp32. fp16 needs CUDA; "
        "bf16 works on CUDA and CPU.",
    )
    eval_every: int = Field(100, ge=1, description="Validate (and log text samples) every this many steps.")
    eval_at_start: bool | None = Field(
        None,
        description="Validate the initial weights before the first step: the step-0 point of the val curve, "
        "at the cost of one full eval (eval_samples forwards per val batch) before training starts. "
        "null: on for `difflm train`, off in sweep trials (their scheduler ranks trials at later steps); "
        "set true in a sweep to compare trials at step 0 too.",
    )
    eval_batches: int | None = Field(
        None,
        ge=1,
        description="Cap on validation: score only the first eval_batches x micro_batch_size val sequences "
        "(a prefix of the split, the same for any worker count); null = the whole val split.",
    )
    eval_samples: int = Field(
        16,
        ge=2,
        le=4096,
        description="K: noise draws per val sequence (masking rates stratified over one range for every "
        "schedule). val/nll averages them; val/nll_se is their Monte Carlo standard error (K >= 2). "
        "16 gives SE ~0.016 nats/token at quickstart size (287 val blocks of 64 bytes); cost: K forwards per batch.",
    )
    eval_seed: int = Field(
        1234, description="Seed of the val noise: sequence i's rates and masks depend on (eval_seed, i) only."
    )
    checkpoint_every: int = Field(500, ge=1, description="Checkpoint every this many steps; a multiple of eval_every.")
    log_every: int = Field(
        10, ge=1, description="Gather train metrics (one host sync) every this many steps; also where a run of "
        "non-finite steps is noticed."
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="Keep this many most recent checkpoints (plus the best by val/nll, "
        "RUN_DIR/checkpoints/best); a corrupted latest one falls back to the one before."
    )
    ema: float | None = Field(
        None, ge=0.0, lt=1.0, description="Decay of an exponential moving average of the weights, used for "
        "validation, samples and `difflm sample|eval`; saved and resumed. null or 0 = off (tiny runs); "
        "0.9999 is typical for long runs (warmed up as min(decay, (1+n)/(10+n)) over the first updates)."
    )
    max_nonfinite: int = Field(
        5, ge=1, le=10000, description="Stop the run after this many optimizer steps in a row with a non-finite "
        "loss or gradient (each one is skipped: no update reaches the weights; counted in train/skipped_steps)."
    )
    num_samples: int = Field(4, ge=0, le=64, description="Text samples logged to TensorBoard at each eval.")
    seed: int = Field(0, description="Seed for init, data order and training noise.")

    @field_validator("lr_phases")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"lr_phases must satisfy 0 <= first <= second <= 1, got {v}")
        return v

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
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto",
        description="CPUs Ray reserves per worker; a CPU worker also gets that many intra-op threads. auto: a "
        "run's workers share the machine's CPUs (or the cluster's, node by node) evenly, at least 1 each; "
        "in a sweep, 1 (trials share the CPUs instead).",
    )
    gpus_per_worker: float = Field(1.0, ge=0.0, description="GPUs Ray reserves per worker when the device is cuda.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    deepspeed: bool = Field(
        True, description="Wrap the model in DeepSpeed; off (or on MPS) runs plain PyTorch, with "
        "DistributedDataParallel across several workers."
    )
    launcher: Literal["auto", "local", "ray"] = Field(
        "auto", description="How `difflm train` runs its workers. auto: one worker without --address trains in "
        "one supervised local process (no Ray: first step in ~5 s instead of ~14 s on 2 cores; same weights, "
        "same restarts), several workers or a cluster use Ray Train. ray: Ray Train always (its dashboard, "
        "its metrics). local: the local process, and an error when the run needs Ray Train. Sweep trials "
        "are placed by Tune either way (sweep.resources.in_trial)."
    )
    max_failures: int = Field(
        3, ge=-1, le=1000, description="Restart the worker group from the latest checkpoint after this many "
        "worker failures (a killed process, a lost node) before the run fails; -1 = no limit, 0 = never."
    )

    @field_validator("cpus_per_worker", mode="before")
    @classmethod
    def _cpus(cls, v: Any) -> Any:
        """One message for both forms (pydantic would report the number and the literal separately)."""
        if v == "auto":
            return v
        try:
            cpus = float("nan") if isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            cpus = float("nan")
        if not cpus > 0:
            raise ValueError(f"must be a number of CPUs above 0 or 'auto', got {v!r}")
        return cpus


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


#: the ``model:`` and ``diffusion:`` sections: each registered family's own class, picked by model.family
#: (difflm.families.registry.section_union); built here, after the built-in families registered
ModelSection = section_union("model")
DiffusionSection = section_union("diffusion")


class RunSpec(StrictModel):
    """A whole training run."""

    model: ModelSection = Field(
        default_factory=lambda: get_family("mdlm").model_config(),
        description="Family and backbone size; the fields beyond the shared ones depend on model.family.",
    )
    diffusion: DiffusionSection = Field(
        default_factory=lambda: get_family("mdlm").config(),
        description="Noise process and loss weights: the fields of model.family's own section (ar: none).",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus and packing.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Text to ids.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and cadence.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Workers, device, DeepSpeed.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Run folder and logging.")
    #: diffusion.schedule was filled in with the family's default (a sweep's trials of other families
    #: must not inherit it: see SweepFile.base_raw)
    _schedule_defaulted: bool = PrivateAttr(default=False)
    stages: list[StageConfig] | None = Field(
        None,
        min_length=1,
        description="Training stages run back to back in one job, each continuing from the previous weights: "
        "[{name, steps, set: {dotted.key: value}}]; cumulative; train.max_steps becomes the sum of steps. "
        "A stage may set the family's switches (mdlm: diffusion.atat.*, diffusion.likelihood_weight) and "
        "its LR schedule (train.lr, warmup_steps, lr_schedule, min_lr_ratio, lr_phases).",
    )

    @model_validator(mode="before")
    @classmethod
    def _family_sections(cls, data: Any) -> Any:
        """Tag ``diffusion`` with model.family so pydantic validates both sections as that family's classes."""
        if not isinstance(data, dict):
            return data
        try:
            return tag_sections(data)
        except KeyError as exc:  # unknown family: one line naming the closest one
            raise ValueError(exc.args[0]) from None

    @model_validator(mode="after")
    def _family_and_schedule(self) -> "RunSpec":
        fam = get_family(self.model.family)
        if fam.schedules and self.diffusion.schedule is None:
            self.diffusion.schedule = fam.schedules[0]  # the family's default
            self._schedule_defaulted = True
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
        if fam.check is not None:
            fam.check(self.model, fam.resolve(self.diffusion))  # ValueError naming the field to change
        if self.train.precision == "fp16" and self.scaling.device in ("cpu", "mps"):
            raise ValueError(f"train.precision fp16 needs CUDA; use bf16 or fp32 on {self.scaling.device}")
        if not self.scaling.deepspeed and self.scaling.zero_stage != 0:
            raise ValueError(
                f"scaling.zero_stage {self.scaling.zero_stage} needs DeepSpeed, but scaling.deepspeed is false "
                "(plain PyTorch / DDP keeps a full copy per worker); set zero_stage: 0 or deepspeed: true"
            )
        if self.train.ema == 0.0:
            self.train.ema = None  # 0 means off, like null: one spelling in saved specs
        if self.train.lr_schedule == "phases" and self.train.lr_phases is None:
            self.train.lr_phases = getattr(self.diffusion, "atat", AtatConfig()).curriculum_bounds
        if self.stages:
            total = sum(s.steps for s in self.stages)
            if "max_steps" in self.train.model_fields_set and self.train.max_steps != total:
                raise ValueError(
                    f"train.max_steps ({self.train.max_steps}) differs from the stages' total ({total}); "
                    "drop train.max_steps (it becomes the sum) or make them agree"
                )
            self.train.max_steps = total
            self.stage_plan()  # every stage must validate too
        return self

    def stage_plan(self) -> list[Stage]:
        """The stages as full run specs with global step ranges; one stage spanning the run when none are given."""
        if not self.stages:
            return [Stage(0, "main", 0, self.train.max_steps, self)]
        fam = get_family(self.model.family)
        raw = self.model_dump(mode="json", exclude={"stages"})
        return resolve_stages(raw, self.stages, fam.switches, fam.name, lambda r: validate_as(RunSpec, r, "resolved stage spec"))

    def build_diffusion(self) -> FamilyConfig:
        """The diffusion config the model is built from: the base one, with the ATAT importance head included
        when any stage turns it on, so one set of weights (and every checkpoint) serves all stages.

        Build models with this (training, checkpoints, doctor); stages then switch at run time. Null
        fields are the family's defaults (``FamilySpec.resolve``), so a stage that leaves
        ``likelihood_weight`` null gets the family's value, not the previous stage's."""
        diffusion = get_family(self.model.family).resolve(self.diffusion)
        if not self.stages or not hasattr(diffusion, "atat") or diffusion.atat.importance_head:
            return diffusion
        if not any(st.spec.diffusion.atat.importance_head for st in self.stage_plan()):
            return diffusion
        atat = diffusion.atat.model_copy(update={"importance_head": True})
        return diffusion.model_copy(update={"atat": atat})

    def run_name(self) -> str:
        return self.output.name or f"{self.model.family}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


def refresh_family_sections() -> None:
    """Rebuild ``model`` / ``diffusion`` of RunSpec and its subclasses (SweepFile) over the families
    registered now: the section union is built when this module is imported, and a family registered
    later (a plugin package, a test-only family) must validate like a built-in one."""
    global ModelSection, DiffusionSection
    ModelSection, DiffusionSection = section_union("model"), section_union("diffusion")
    todo: list[type[StrictModel]] = [RunSpec]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        for name, kind in (("model", ModelSection), ("diffusion", DiffusionSection)):
            old = cls.model_fields[name]
            cls.model_fields[name] = FieldInfo.from_annotated_attribute(
                kind, Field(default_factory=old.default_factory, description=old.description)
            )
        cls.model_rebuild(force=True)


on_register(refresh_family_sections)


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
    before = _family_of(raw)
    raw = apply_overrides(raw, overrides, source=str(path))
    raw = switch_family(raw, before, overrides, source=str(path))
    return validate_as(RunSpec, raw, source=str(path))


def _family_of(raw: dict[str, Any]) -> Any:
    model = raw.get("model")
    return model.get("family", "mdlm") if isinstance(model, dict) else "mdlm"


def switch_family(raw: dict[str, Any], before: Any, overrides: list[str] | tuple[str, ...], source: str) -> dict[str, Any]:
    """``--set model.family=X`` on a spec of another family: drop the file's ``model`` / ``diffusion``
    fields that X does not read, with a note on stderr, so one --set switches the family.

    Why not an error: the spec's own fields are right for the family it was written for, and naming
    each one to remove would take a --set per field that has no way to delete a key. Fields set by an
    override are never dropped (a --set that X does not read still fails, naming it); in a spec file
    itself, a field its family does not read is always an error."""
    after = _family_of(raw)
    if after == before or not isinstance(after, str) or after not in family_names():
        return raw
    fam = get_family(after)
    set_keys = [".".join(parse_override(item)[0]) for item in overrides]
    dropped: list[str] = []
    for section, cls in (("model", fam.model_config), ("diffusion", fam.config)):
        sec = raw.get(section)
        if not isinstance(sec, dict):
            continue
        for key in [k for k in sec if k not in cls.model_fields]:
            path = f"{section}.{key}"
            if not any(k == path or k.startswith(path + ".") for k in set_keys):
                del sec[key]
                dropped.append(path)
    if dropped:
        print(f"note: {source}: --set model.family={after} (the file's family: {before}): dropped "
              f"{', '.join(dropped)}, which {after} does not read", file=sys.stderr)
    return raw


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
