"""sedd's sections: the graph and noise range, continuous time; a pure score-entropy loss (no likelihood weight).

The run spec validates ``diffusion:`` as :class:`SeddConfig` and ``model:`` as :class:`SeddModelConfig`
when ``model.family`` is ``sedd`` (see ``difflm/families/config.py``), so any other field is an unknown key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from difflm.families.config import ContinuousTimeFields, GraphFields, ScheduleFields
from difflm.models.config import TimeConditioningMixin


class SeddConfig(GraphFields, ContinuousTimeFields, ScheduleFields):
    """The ``diffusion:`` section of family sedd."""

    family: Literal["sedd"] = Field("sedd", exclude=True, description="Set from model.family; do not write it.")


class SeddModelConfig(TimeConditioningMixin):
    """The ``model:`` section of family sedd."""

    family: Literal["sedd"] = Field("sedd", description="Model family from the registry.")
