"""MDLM: masked (absorbing-state) diffusion with the SUBS parameterization (Sahoo et al., 2024).

model.py: MDLM (loss, NELBO, denoise) and its builder; samplers.py: ddpm, ddpm_cache, analytic, remasking, semi-AR;
atat.py: ATAT importance head, adaptive masking, curriculum (training forward only).
Importing this package registers the family.
"""

from __future__ import annotations

from difflm.schedules import MDLM_SCHEDULES
from difflm.families.mdlm.model import MDLM, build_mdlm
from difflm.families.mdlm.config import MdlmConfig, MdlmModelConfig
from difflm.families.registry import FamilySpec, register_family

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
    )
)

__all__ = ['MDLM', 'build_mdlm']
