"""BD3-LM's sections: masked diffusion within blocks of ``block_size`` tokens, autoregressive over blocks.

The run spec validates ``diffusion:`` as :class:`Bd3lmConfig` and ``model:`` as :class:`Bd3lmModelConfig`
when ``model.family`` is ``bd3lm``. No time conditioning (BD3-LMs train without it, and the exact KV cache
of clean blocks assumes the network does not depend on a per-block noise level).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from difflm.families.config import ContinuousTimeFields, ScheduleFields
from difflm.models.config import BackboneConfig


class Bd3lmConfig(ContinuousTimeFields, ScheduleFields):
    """The ``diffusion:`` section of family bd3lm."""

    family: Literal["bd3lm"] = Field("bd3lm", exclude=True, description="Set from model.family; do not write it.")
    block_size: int = Field(
        4, ge=1, le=1_000_000,
        description="bd3lm: tokens per block. Blocks are generated left to right, each by masked diffusion given "
        "the clean blocks before it. 1 = autoregressive; >= data.seq_len = MDLM (one block). BD3-LMs' best "
        "perplexity: 4.",
    )
    noise_clip: tuple[float, float] | None = Field(
        None,
        description="bd3lm: [beta, omega], training masking rates drawn uniformly in this range instead of the "
        "schedule's full (0, 1] (BD3-LMs' clipped schedule, which lowers the variance of the training loss; "
        "their data-driven search of the range is not implemented: set it by hand, e.g. [0.3, 0.8]). Only the "
        "training draw changes: val/nll is always the full NELBO over (0, 1].",
    )

    @model_validator(mode="after")
    def _clip_range(self) -> "Bd3lmConfig":
        if self.noise_clip is not None:
            lo, hi = self.noise_clip
            if not 0.0 < lo < hi <= 1.0:
                raise ValueError(f"noise_clip [beta, omega] must satisfy 0 < beta < omega <= 1, got [{lo}, {hi}]")
        return self


class Bd3lmModelConfig(BackboneConfig):
    """The ``model:`` section of family bd3lm."""

    family: Literal["bd3lm"] = Field("bd3lm", description="Model family from the registry.")
