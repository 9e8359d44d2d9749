"""bijective's sections: mdlm's fields without ATAT, plus the number of coupling blocks.

The run spec validates ``diffusion:`` as :class:`BijectiveConfig` and ``model:`` as :class:`BijectiveModelConfig`
when ``model.family`` is ``bijective`` (see ``difflm/families/config.py``), so any other field is an unknown key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from difflm.families.config import ContinuousTimeFields, LikelihoodWeightField, ScheduleFields
from difflm.models.config import BijectiveBlocksMixin, TimeConditioningMixin


class BijectiveConfig(LikelihoodWeightField, ContinuousTimeFields, ScheduleFields):
    """The ``diffusion:`` section of family bijective."""

    family: Literal["bijective"] = Field("bijective", exclude=True, description="Set from model.family; do not write it.")


class BijectiveModelConfig(BijectiveBlocksMixin, TimeConditioningMixin):
    """The ``model:`` section of family bijective."""

    family: Literal["bijective"] = Field("bijective", description="Model family from the registry.")
