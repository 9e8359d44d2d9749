"""Diffusion process sub-config (shared by every family; each family reads what it needs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from difflm._config import StrictModel


class DiffusionConfig(StrictModel):
    """Noise schedule, time sampling and loss weighting."""

    schedule: str | None = Field(
        None,
        description="Noise schedule; null = the family's default (mdlm, sedd, bijective: loglinear; diffusion_lm: "
        "sqrt). mdlm and bijective: loglinear, linear, cosine, cosinesqr, geometric, sqrt; "
        "sedd: loglinear, geometric (sigma_min..sigma_max); "
        "diffusion_lm: sqrt, cosine, linear (Gaussian schedules over `timesteps` steps).",
    )
    eps: float = Field(1e-3, gt=0.0, lt=0.5, description="Schedule epsilon: the masked share at t=1 is 1 - eps.")
    sampling_eps: float = Field(1e-3, ge=0.0, lt=0.5, description="Times are drawn from [sampling_eps, 1].")
    antithetic: bool = Field(True, description="Antithetic (stratified) time sampling across the batch: lower variance.")
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
    timesteps: int = Field(
        2000, ge=1, le=100000, description="Discrete diffusion steps T (families with discrete time, e.g. diffusion_lm)."
    )
    sample_steps: int = Field(128, ge=1, le=100000, description="Denoising steps for the samples logged at eval.")
    clamp_sampling: bool = Field(
        False,
        description="diffusion_lm: the clamping trick, snapping the predicted x0 to the nearest word embedding "
        "at every sampling step (Li et al. 2022). Off: plain ancestral sampling, rounding only at the end.",
    )
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
    def _sigma_range(self) -> "DiffusionConfig":
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")
        return self
