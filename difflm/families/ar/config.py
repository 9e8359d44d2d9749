"""ar's sections: no noise process, so no ``diffusion:`` field at all, and only the shared model fields.

The run spec validates ``diffusion:`` as :class:`ARConfig` and ``model:`` as :class:`ARModelConfig`
when ``model.family`` is ``ar`` (see ``difflm/families/config.py``), so any other field is an unknown key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from difflm.families.config import FamilyConfig
from difflm.models.config import BackboneConfig


class ARConfig(FamilyConfig):
    """The ``diffusion:`` section of family ar."""

    family: Literal["ar"] = Field("ar", exclude=True, description="Set from model.family; do not write it.")


class ARModelConfig(BackboneConfig):
    """The ``model:`` section of family ar."""

    family: Literal["ar"] = Field("ar", description="Model family from the registry.")
