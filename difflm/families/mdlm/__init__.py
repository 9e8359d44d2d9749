"""MDLM: masked (absorbing-state) diffusion with the SUBS parameterization (Sahoo et al., 2024).

model.py: MDLM (loss, NELBO, denoise) and its builder; samplers.py: ddpm, ddpm_cache, analytic, remasking, semi-AR;
atat.py: ATAT importance head, adaptive masking, curriculum (training forward only).
Importing this package registers the family, with its samplers.
"""

from __future__ import annotations

from typing import Any

from difflm.schedules import MDLM_SCHEDULES
from difflm.families.mdlm import fast, samplers as ms
from difflm.families.mdlm.model import MDLM, build_mdlm
from difflm.families.mdlm.config import MdlmConfig, MdlmModelConfig
from difflm.families.registry import FamilySpec, register_family

#: mdlm's samplers (bijective registers the same ones: it is an MDLM on invertible blocks)
#: ddpm / ddpm_cache go through fast.py: the same loops, plus threshold decoding, block decoding and the KV caches
MDLM_SAMPLERS = {"ddpm_cache": fast.ddpm_cache, "ddpm": fast.ddpm, "analytic": ms.analytic}


def default_masked_sampler(model: Any) -> str:
    """ddpm_cache, or plain ddpm for a time-conditioned model (its output changes every step: caching is invalid)."""
    return "ddpm" if model.time_conditioning else "ddpm_cache"


register_family(
    FamilySpec(
        name="mdlm",
        config=MdlmConfig,
        model_config=MdlmModelConfig,
        build=build_mdlm,
        schedules=MDLM_SCHEDULES,
        description="Masked (absorbing-state) diffusion, SUBS parameterization, continuous-time NELBO (MDLM).",
        defaults={"likelihood_weight": 1.0},
        switches=("atat", "likelihood_weight"),
        samplers=MDLM_SAMPLERS,
        default_sampler=default_masked_sampler,
    )
)

__all__ = ['MDLM', 'build_mdlm', 'MDLM_SAMPLERS', 'default_masked_sampler']
