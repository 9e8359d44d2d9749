"""Backbones and their config. Families build a :class:`Backbone` from explicit dims."""

from difflm.models.backbone import Backbone, DiTBlock, FinalLayer, TimestepEmbedder
from difflm.models.config import SIZE_PRESETS, ModelConfig

__all__ = [
    "Backbone",
    "DiTBlock",
    "FinalLayer",
    "TimestepEmbedder",
    "ModelConfig",
    "SIZE_PRESETS",
]
