"""BD3-LM's sections: masked diffusion within blocks of ``block_size`` tokens, autoregressive over blocks.

The run spec validates ``diffusion:`` as :class:`Bd3lmConfig` and ``model:`` as :class:`Bd3lmModelConfig`
when ``model.family`` is ``bd3lm``. No time conditioning (BD3-LMs train without it, and the exact KV cache
of clean blocks assumes the network does not depend on a per-block noise level).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from difflm._config import StrictModel
from difflm.families.config import ContinuousTimeFields, ScheduleFields
from difflm.models.config import BackboneConfig


class ClipSearchConfig(StrictModel):
    """BD3-LMs' data-driven clipped schedule ("var_min"): at every eval point, pick the training clip range
    whose training loss has the least variance on val batches (difflm/families/bd3lm/clipped.py)."""

    widths: list[float] = Field(
        [0.5, 0.6, 0.7, 0.8, 0.9], min_length=1, max_length=20,
        description="Widths w of the candidate ranges [i, i + w], i = 0, delta, 2 delta, ... <= 1 - w (i = 0 "
        "starts at sampling_eps); the full range [sampling_eps, 1] is always a candidate. Each in (0, 1]. "
        "BD3-LMs' OpenWebText recipe: [0.5, 0.6, 0.7, 0.8, 0.9] (36 candidates with delta 0.05).",
    )
    delta: float = Field(
        0.05, gt=0.0, le=0.5,
        description="Step between the starts of candidate ranges of one width (BD3-LMs: 0.05). Smaller = more "
        "candidates: each costs `batches` extra forwards per eval point.",
    )
    batches: int = Field(
        10, ge=1, le=1000,
        description="Val micro-batches each candidate is scored on per eval point (BD3-LMs: 100). Cost: "
        "candidates x batches forwards of 2 x seq_len tokens at every eval; more batches = a less noisy choice.",
    )
    update: bool = Field(
        True,
        description="Move the training clip range to the candidate of least variance after each search; false "
        "only logs the variances and keeps the starting range (BD3-LMs' fix_clipping).",
    )

    @field_validator("widths")
    @classmethod
    def _widths_in_range(cls, widths: list[float]) -> list[float]:
        bad = [w for w in widths if not 0.0 < w <= 1.0]
        if bad:
            raise ValueError(f"each width must be in (0, 1] (a share of the rate range), got {bad}")
        return widths


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
        description="bd3lm: [beta, omega], training masking rates drawn uniformly in this range (weight 1/m) "
        "instead of the schedule's full (0, 1] (BD3-LMs' clipped schedule, which lowers the variance of the "
        "training loss), e.g. [0.3, 0.8]. With clip_search on it is the starting range (null: [sampling_eps, 1]). "
        "Only the training draw changes: val/nll is always the full NELBO over (0, 1].",
    )
    clip_search: ClipSearchConfig | None = Field(
        None,
        description="bd3lm: BD3-LMs' data-driven clip search: at every eval point after step 0, score each "
        "candidate range's training loss on val batches (EMA weights) and train on the one of least variance "
        "of per-block losses; the chosen range is saved in the weights (buffer clip_range) and logged as "
        "val/clip_beta, val/clip_omega. null = off (noise_clip, if set, stays fixed). Block size 1 compares only "
        "the full range with [1, 1] (every token masked: the exact AR NLL).",
    )
    resample_masks: bool = Field(
        False,
        description="bd3lm: with a clip range [beta, omega] (noise_clip or clip_search), redraw each block's "
        "masks until its masked share of the block's counted tokens lies in [beta, omega] (BD3-LMs' "
        "training.resample; drawn exactly, without a rejection loop). beta <= sampling_eps sets no lower "
        "bound. Needs a clip range and block_size >= 2.",
    )

    @model_validator(mode="after")
    def _clip_range(self) -> "Bd3lmConfig":
        if self.noise_clip is not None:
            lo, hi = self.noise_clip
            if not 0.0 < lo < hi <= 1.0:
                raise ValueError(f"noise_clip [beta, omega] must satisfy 0 < beta < omega <= 1, got [{lo}, {hi}]")
        if self.resample_masks:
            if self.noise_clip is None and self.clip_search is None:
                raise ValueError("resample_masks needs a clip range: set noise_clip: [beta, omega] or clip_search, "
                                 "or resample_masks: false")
            if self.block_size < 2:
                raise ValueError("resample_masks needs block_size >= 2 (a one-token block's masked share is 0 or 1); "
                                 "set resample_masks: false")
        return self


class Bd3lmModelConfig(BackboneConfig):
    """The ``model:`` section of family bd3lm."""

    family: Literal["bd3lm"] = Field("bd3lm", description="Model family from the registry.")
