"""The ``diffusion:`` section's building blocks: one config class per family, assembled from these.

Each family declares its own section class in ``difflm/families/<name>/config.py`` by combining the
field groups below (e.g. mdlm = schedule/sampling + continuous time + likelihood weight + ATAT) and
names it in its registry entry (``FamilySpec.config``). The run spec's ``diffusion:`` is the union of
those classes, picked by ``model.family`` (the ``family`` tag is copied in by the run spec and never
written out), so a field the family does not read is an unknown key, with the closest valid one, and
the JSON Schema shows each family's own fields. :class:`DiffusionConfig` is the flat union of every
field, kept for library callers that build a model without a spec; ``build_model`` converts it.
This module is a leaf (pydantic only): the families' config modules import it, never the reverse.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from difflm._config import StrictModel


class FamilyConfig(StrictModel):
    """Base of every family's ``diffusion:`` section: only the family tag, copied from ``model.family``.

    The tag lets pydantic pick the family's class (a discriminated union in the run spec) and is
    excluded from dumps, so saved specs keep their old shape. A family with no noise process (ar)
    uses a subclass with no other field: any ``diffusion:`` key is then an unknown key."""

    family: str | None = Field(
        None, exclude=True, description="Set from model.family by the run spec; do not write it."
    )

    def steps_for(self, length: int) -> int:
        """Sampler steps for samples of ``length`` tokens: the family's ``sample_steps``, or ``length`` for a
        family with no noise process (ar draws one token per network evaluation and ignores it)."""
        return length


class ScheduleFields(FamilyConfig):
    """Fields of every family with a noise process: schedule, antithetic time sampling, sample steps."""

    schedule: str | None = Field(
        None,
        description="Noise schedule; null = the family's default (mdlm, sedd, bijective: loglinear; diffusion_lm: "
        "sqrt). mdlm and bijective: loglinear, linear, cosine, cosinesqr, geometric, sqrt; "
        "sedd: loglinear, geometric (sigma_min..sigma_max); "
        "diffusion_lm: sqrt, cosine, linear (Gaussian schedules over `timesteps` steps).",
    )
    antithetic: bool = Field(True, description="Antithetic (stratified) time sampling across the batch: lower variance.")
    sample_steps: int = Field(128, ge=1, le=100000, description="Denoising steps for the samples logged at eval.")

    def steps_for(self, length: int) -> int:
        return self.sample_steps


class ContinuousTimeFields(FamilyConfig):
    """Continuous-time families (mdlm, sedd, bijective): the schedule's epsilon and the time range."""

    eps: float = Field(1e-3, gt=0.0, lt=0.5, description="Schedule epsilon: the masked share at t=1 is 1 - eps.")
    sampling_eps: float = Field(1e-3, ge=0.0, lt=0.5, description="Times are drawn from [sampling_eps, 1].")


class LikelihoodWeightField(FamilyConfig):
    """Families whose loss mixes a likelihood term with another one (mdlm, diffusion_lm, bijective)."""

    likelihood_weight: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Loss weight; null = the family's default (mdlm, diffusion_lm: 1.0; bijective: 0.001). "
        "mdlm: w in loss = w * NELBO + (1 - w) * unweighted masked cross-entropy (1 = pure NELBO). "
        "diffusion_lm: weight of the rounding (decoder) NLL added to the x0 MSE and prior terms. "
        "bijective: w in loss = denoising NELBO + w * (flow NLL - log|det J|) per token (docs/families.md). "
        "The val metric is always the NELBO.",
    )


class DiscreteTimeFields(FamilyConfig):
    """Discrete-time Gaussian diffusion (diffusion_lm): the number of steps and the clamping sampler."""

    timesteps: int = Field(
        2000, ge=1, le=100000, description="Discrete diffusion steps T (families with discrete time, e.g. diffusion_lm)."
    )
    clamp_sampling: bool = Field(
        False,
        description="diffusion_lm: the clamping trick, snapping the predicted x0 to the nearest word embedding "
        "at every sampling step (Li et al. 2022). Off: plain ancestral sampling, rounding only at the end.",
    )


class GraphFields(FamilyConfig):
    """Score-entropy diffusion (sedd): the graph and the geometric noise range."""

    graph: Literal["absorb", "uniform"] = Field(
        "absorb",
        description="sedd only: the discrete diffusion graph. absorb: tokens jump to a MASK token (only masked "
        "positions are scored); uniform: tokens jump to uniformly random tokens (every position is scored; "
        "needs model.time_conditioning: true).",
    )
    sigma_min: float = Field(
        1e-4, gt=0.0, description="sedd only, schedule geometric: total noise sigma at t = 0 (SEDD's 1e-4)."
    )
    sigma_max: float = Field(
        20.0,
        gt=0.0,
        le=100.0,
        description="sedd only, schedule geometric: total noise sigma at t = 1 (SEDD's 20: 1 - e^-20 of tokens "
        "noised). Must exceed sigma_min.",
    )

    @model_validator(mode="after")
    def _sigma_range(self) -> "GraphFields":
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")
        return self


class AtatConfig(StrictModel):
    """ATAT: importance estimator, importance-biased (adaptive) masking, easy -> hard curriculum (mdlm only).

    All off by default (plain MDLM). Everything here changes only the *training* forward: validation,
    ``difflm eval`` and sampling always use plain, unbiased masking, so ATAT runs compare with plain
    mdlm on the same val NELBO. The maths is in ``difflm/families/mdlm/atat.py``; docs/atat.md explains it.
    """

    importance_head: bool = Field(
        False,
        description="Build and train the importance estimator: a small transformer reading the backbone's "
        "final hidden states (of a noisy probe or of the clean sequence: importance_from) and predicting, per "
        "token, in [0, 1], how likely the denoiser is to get that token wrong when it is masked (target: "
        "1 - p(x0 | x_t), detached). Costs one extra no-grad backbone pass per training micro-batch.",
    )
    head_width: int = Field(256, ge=8, le=4096, description="Importance head: hidden width (the journal: 256).")
    head_layers: int = Field(2, ge=1, le=12, description="Importance head: transformer layers (the journal: 2).")
    head_heads: int = Field(4, ge=1, le=64, description="Importance head: attention heads; must divide head_width.")
    head_loss_weight: float = Field(
        1.0, gt=0.0, le=100.0,
        description="Weight of the head's loss (its KL to the targets) in the training loss, on top of a fixed "
        "1e-3 that keeps the head's gradients out of the global grad-norm clip (atat.HEAD_GRAD_SCALE). The head "
        "reads detached features, so the backbone's gradients never see it; under AdamW a constant factor "
        "barely changes the head's own steps either (Adam normalises them).",
    )
    adaptive_masking: bool = Field(
        False,
        description="Bias each token's masking probability by its predicted importance (needs importance_head). "
        "The per-sequence mean probability still equals the schedule's move_chance(t), so the overall "
        "masking rate is the schedule's; only *which* tokens get masked changes.",
    )
    strength: float = Field(
        2.0, ge=0.0, le=20.0,
        description="Adaptive masking: logit gap between the most and the least favoured token of a sequence "
        "(0 = uniform masking; 2 = the favoured tokens are up to e^2 ~ 7x more likely to be masked in odds).",
    )
    focus: Literal["easy", "medium", "hard"] = Field(
        "hard",
        description="Adaptive masking without the curriculum: which tokens (by importance rank within the "
        "sequence) are masked more often.",
    )
    curriculum: bool = Field(
        False,
        description="Move the focus easy -> medium -> hard over the training stage's steps at curriculum_bounds "
        "(needs adaptive_masking). The phase is a function of the step, so it survives resume.",
    )
    curriculum_bounds: tuple[float, float] = Field(
        (0.3, 0.7),
        description="Curriculum phase boundaries as fractions of the stage's steps: easy before the first, "
        "medium until the second, hard after (the journal: 0.3, 0.7). train.lr_schedule: phases uses the "
        "same boundaries by default (warmup, constant, cosine).",
    )
    weighted_loss: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Importance-weighted loss: each masked token's loss times (1 - a) + a * s / mean(s), s its "
        "predicted importance (detached, mean over the batch's masked tokens, so the loss scale is kept). "
        "0 = off, 1 = fully weighted. Needs importance_head.",
    )

    importance_from: Literal["clean", "noisy"] = Field(
        "noisy",
        description="What the importance head reads. noisy: the hidden states of a probe x_t' masked uniformly "
        "at a higher rate move_chance(t)^probe_power; the adaptive mask is then drawn *inside* the probe's "
        "masked set, so every token the head saw stays visible and the mask carries no information about "
        "the masked tokens beyond the visible ones. clean: the hidden states of the clean sequence x0 (the "
        "seed journal's variant; the mask then depends on the answer). docs/atat.md compares them.",
    )
    probe_power: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="importance_from noisy: the probe's masking rate is move_chance(t) ** probe_power (> the "
        "schedule's rate); the final mask keeps a share move_chance(t) / probe rate of the probe's masks, "
        "biased by importance. Smaller: more room to bias, but the probe hides more context from the head.",
    )
    unbiased: bool = Field(
        False,
        description="Importance-sampling weights: each masked token's loss times (its plain masking probability) / "
        "(its adaptive one), clipped at max_weight, so each token's expected weight equals plain masking's "
        "and the expected loss is the plain NELBO (exactly for a context-free denoiser; docs/atat.md): "
        "adaptive masking then changes the variance, not the objective. Needs adaptive_masking.",
    )
    max_weight: float = Field(
        10.0, ge=1.0, le=1000.0,
        description="unbiased: clip of the importance-sampling weight. The weight never exceeds e^strength, so "
        "the clip only acts (and only then biases the loss down at the rarely masked tokens) when "
        "strength > ln(max_weight).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "AtatConfig":
        lo, hi = self.curriculum_bounds
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"curriculum_bounds must satisfy 0 <= first <= second <= 1, got ({lo}, {hi})")
        if self.head_width % self.head_heads != 0:
            raise ValueError(f"head_heads={self.head_heads} must divide head_width={self.head_width}")
        needs = [n for n, on in (("adaptive_masking", self.adaptive_masking), ("weighted_loss", self.weighted_loss > 0))
                 if on]
        if needs and not self.importance_head:
            verb = "needs" if len(needs) == 1 else "need"
            raise ValueError(f"{' and '.join(needs)} {verb} the importance estimator: set importance_head: true")
        if self.unbiased and not self.adaptive_masking:
            raise ValueError("unbiased reweights adaptive masks: set adaptive_masking: true (plain masks need no weights)")
        if self.curriculum and not self.adaptive_masking:
            raise ValueError("curriculum moves the adaptive-masking focus: set adaptive_masking: true")
        return self

    @property
    def active(self) -> bool:
        """Does anything here change the training forward (plain MDLM otherwise)?"""
        return self.importance_head


class AtatField(FamilyConfig):
    """mdlm's ATAT section."""

    atat: AtatConfig = Field(
        default_factory=AtatConfig,
        description="mdlm: ATAT importance estimator, adaptive masking, curriculum, importance-weighted loss "
        "(training only; val is always plain masking). See docs/atat.md.",
    )


class DiffusionConfig(AtatField, GraphFields, DiscreteTimeFields, LikelihoodWeightField, ContinuousTimeFields,
                      ScheduleFields):
    """Flat ``diffusion:`` config with every family's fields, for building a model outside a run spec.

    A run spec uses the family's own class instead; :func:`difflm.families.build_model` converts this
    one, rejecting a field set to a non-default value that the family does not read."""


def non_default_fields(cfg: Any) -> dict[str, Any]:
    """The fields of a pydantic config whose value differs from the default, as plain data (nested too).

    What a flat config means for one family: a field left at its default was not chosen, so a family
    that lacks it loses nothing (a resolved spec, every field spelled out, must convert again)."""
    return cfg.model_dump(mode="json", exclude_defaults=True)
