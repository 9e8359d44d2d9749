"""BD3-LM: block diffusion (Arriola et al., ICLR 2025), autoregressive over blocks, masked diffusion within.

model.py: BD3LM (vectorised training on [x_t, x0] with the block-causal mask, val NELBO, denoise) and its
builder; samplers.py: block-by-block decoding with an exact KV cache of the finished clean blocks.
Importing this package registers the family, with its samplers.
"""

from __future__ import annotations

from difflm.families.bd3lm import samplers as bs
from difflm.families.bd3lm.config import Bd3lmConfig, Bd3lmModelConfig
from difflm.families.bd3lm.model import BD3LM, block_diffusion_mask, build_bd3lm
from difflm.families.registry import FamilySpec, register_family
from difflm.schedules import MDLM_SCHEDULES

register_family(
    FamilySpec(
        name="bd3lm",
        config=Bd3lmConfig,
        model_config=Bd3lmModelConfig,
        build=build_bd3lm,
        schedules=MDLM_SCHEDULES,
        description="Block diffusion (BD3-LM): masked diffusion within blocks of diffusion.block_size tokens, "
        "autoregressive over blocks; NELBO; exact KV cache when sampling.",
        # ddpm: block by block with the exact KV cache of the finished blocks; ddpm_uncached recomputes them
        samplers={"ddpm": bs.ddpm, "ddpm_uncached": bs.ddpm_uncached},
        default_sampler="ddpm",
    )
)

__all__ = ["BD3LM", "build_bd3lm", "block_diffusion_mask"]
