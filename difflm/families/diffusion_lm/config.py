"""diffusion_lm's sections: discrete-time Gaussian diffusion on word embeddings; time conditioning is always on.

The run spec validates ``diffusion:`` as :class:`DiffusionLMConfig` and ``model:`` as :class:`DiffusionLMModelConfig`
when ``model.family`` is ``diffusion_lm`` (see ``difflm/families/config.py``), so any other field is an unknown key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from difflm.families.config import DiscreteTimeFields, LikelihoodWeightField, ScheduleFields
from difflm.models.config import EmbedDimMixin


class DiffusionLMConfig(LikelihoodWeightField, DiscreteTimeFields, ScheduleFields):
    """The ``diffusion:`` section of family diffusion_lm."""

    family: Literal["diffusion_lm"] = Field("diffusion_lm", exclude=True, description="Set from model.family; do not write it.")


class DiffusionLMModelConfig(EmbedDimMixin):
    """The ``model:`` section of family diffusion_lm."""

    family: Literal["diffusion_lm"] = Field("diffusion_lm", description="Model family from the registry.")
