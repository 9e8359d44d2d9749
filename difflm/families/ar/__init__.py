"""AR: the autoregressive baseline on the same backbone (causal attention, exact NLL).

model.py: AR and its builder; samplers.py: left-to-right ancestral sampling with prefix prompts.
Importing this package registers the family.
"""

from __future__ import annotations

from difflm.families.ar import samplers as ar_samplers
from difflm.families.ar.model import AR, build_ar
from difflm.families.ar.config import ARConfig, ARModelConfig
from difflm.families.registry import FamilySpec, register_family

register_family(
    FamilySpec(
        name="ar",
        config=ARConfig,
        model_config=ARModelConfig,
        build=build_ar,
        schedules=(),
        description="Autoregressive baseline: same backbone, causal attention, exact next-token NLL.",
        samplers={"ancestral": ar_samplers.ancestral},
    )
)

__all__ = ['AR', 'build_ar']
