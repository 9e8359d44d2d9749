"""MDLM's sections: continuous-time masked diffusion with an optional likelihood weight and ATAT.

The run spec validates ``diffusion:`` as :class:`MdlmConfig` and ``model:`` as :class:`MdlmModelConfig`
when ``model.family`` is ``mdlm`` (see ``difflm/families/config.py``), so any other field is an unknown key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from difflm.families.config import AtatField, ContinuousTimeFields, LikelihoodWeightField, ScheduleFields
from difflm.models.config import TimeConditioningMixin


class MdlmConfig(AtatField, LikelihoodWeightField, ContinuousTimeFields, ScheduleFields):
    """The ``diffusion:`` section of family mdlm."""

    family: Literal["mdlm"] = Field("mdlm", exclude=True, description="Set from model.family; do not write it.")


class MdlmModelConfig(TimeConditioningMixin):
    """The ``model:`` section of family mdlm."""

    family: Literal["mdlm"] = Field("mdlm", description="Model family from the registry.")
