"""AR: the autoregressive baseline on the same backbone (causal attention, exact NLL).

model.py: AR and its builder; samplers.py: left-to-right ancestral sampling with prefix prompts.
Importing this package registers the family.
"""

from __future__ import annotations

from difflm.families.ar.model import AR, build_ar
from difflm.families.registry import FamilySpec, register_family

register_family(
    FamilySpec(
        name="ar",
        build=build_ar,
        schedules=(),
        description="Autoregressive baseline: same backbone, causal attention, exact next-token NLL.",
        reads=frozenset(),  # no noise process: every diffusion.* field and time conditioning are ignored
    )
)

__all__ = ['AR', 'build_ar']
