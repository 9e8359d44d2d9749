"""Diffusion process sub-config (shared by every family; each family reads what it needs)."""

from __future__ import annotations

from pydantic import Field

from difflm._config import StrictModel


class DiffusionConfig(StrictModel):
    """Noise schedule, time sampling and loss weighting."""

    schedule: str | None = Field(
        None,
        description="Noise schedule; null = the family's default (mdlm: loglinear, diffusion_lm: sqrt). "
        "mdlm: loglinear, linear, cosine, cosinesqr, geometric, sqrt; "
        "diffusion_lm: sqrt, cosine, linear (Gaussian schedules over `timesteps` steps).",
    )
    eps: float = Field(1e-3, gt=0.0, lt=0.5, description="Schedule epsilon: the masked share at t=1 is 1 - eps.")
    sampling_eps: float = Field(1e-3, ge=0.0, lt=0.5, description="Times are drawn from [sampling_eps, 1].")
    antithetic: bool = Field(True, description="Antithetic (stratified) time sampling across the batch: lower variance.")
    likelihood_weight: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="mdlm: w in loss = w * NELBO + (1 - w) * unweighted masked cross-entropy (1 = pure NELBO). "
        "diffusion_lm: weight of the rounding (decoder) NLL added to the x0 MSE and prior terms. "
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
