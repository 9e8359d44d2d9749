"""Diffusion-LM: Gaussian diffusion on learned word embeddings (Li et al., 2022).

model.py: DiffusionLM and its builder; samplers.py: ancestral / clamping sampler; diagnostics.py: per-noise-level
metrics and the collapse warning; gaussian.py: the Gaussian schedules; denoiser.py, bart.py: the two denoisers.
Importing this package registers the family.
"""

from __future__ import annotations

from typing import Any

from difflm.families.diffusion_lm import samplers as ds
from difflm.families.diffusion_lm.gaussian import GAUSSIAN_SCHEDULES
from difflm.families.diffusion_lm.model import DiffusionLM, build_diffusion_lm
from difflm.families.diffusion_lm.config import DiffusionLMConfig, DiffusionLMModelConfig
from difflm.families.registry import FamilySpec, register_family



def default_sampler(model: Any) -> str:
    """ancestral_clamp when the run set ``diffusion.clamp_sampling``, else ancestral."""
    return "ancestral_clamp" if model.clamp_sampling else "ancestral"


register_family(
    FamilySpec(
        name="diffusion_lm",
        config=DiffusionLMConfig,
        model_config=DiffusionLMModelConfig,
        build=build_diffusion_lm,
        schedules=GAUSSIAN_SCHEDULES,
        description="Diffusion-LM: Gaussian diffusion on learned word embeddings, x0-prediction, tied rounding.",
        backbones=("transformer", "bart"),
        defaults={"likelihood_weight": 1.0},
        samplers={"ancestral": ds.ancestral, "ancestral_clamp": ds.ancestral_clamp},
        default_sampler=default_sampler,
    )
)

__all__ = ['DiffusionLM', 'build_diffusion_lm']
