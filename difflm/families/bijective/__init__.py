"""Family ``bijective``: masked diffusion on invertible transformer blocks with an exact log-determinant.

    flow.py   coupling blocks (exact inverse and log|det J|) and the BijectiveBackbone
    model.py  the family: denoising NELBO + likelihood_weight x (flow NLL - log-det), val NELBO, diagnostics

Sampling, prompting and denoise are mdlm's: denoise is inherited from MDLM, and the registry entry registers
mdlm's samplers (``difflm.families.mdlm.MDLM_SAMPLERS``) with the same default.
Importing the package registers the family; its likelihood_weight default is 0.001 (FamilySpec.defaults).
"""

from __future__ import annotations

from difflm.families.bijective.flow import BijectiveBackbone, CouplingBlock
from difflm.families.bijective.model import (
    DEFAULT_LIKELIHOOD_WEIGHT,
    Bijective,
    build_bijective,
    check_bijective,
)
from difflm.families.bijective.config import BijectiveConfig, BijectiveModelConfig
from difflm.families.mdlm import MDLM_SAMPLERS, default_masked_sampler
from difflm.families.registry import FamilySpec, register_family
from difflm.schedules import MDLM_SCHEDULES

register_family(
    FamilySpec(
        name="bijective",
        config=BijectiveConfig,
        model_config=BijectiveModelConfig,
        build=build_bijective,
        schedules=MDLM_SCHEDULES,
        description="Masked diffusion on invertible (affine coupling) blocks: denoising NELBO + weighted flow "
        "likelihood with an exact log-determinant.",
        defaults={"likelihood_weight": DEFAULT_LIKELIHOOD_WEIGHT},
        check=check_bijective,
        samplers=MDLM_SAMPLERS,
        default_sampler=default_masked_sampler,
    )
)

__all__ = ["Bijective", "BijectiveBackbone", "CouplingBlock", "build_bijective", "check_bijective",
           "DEFAULT_LIKELIHOOD_WEIGHT"]
