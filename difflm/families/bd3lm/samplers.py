"""BD3-LM sampling: block by block, masked diffusion within each block, with an exact KV cache.

For block b the network sees the clean blocks < b and the noisy block b, which attends to all of them
and to itself: exactly the noisy rows of the training mask. A clean block attends only to clean blocks
<= it, so its keys and values never change once it is finished: caching them is **exact** (not the
approximation of Fast-dLLM's caches for bidirectional models). ``ddpm`` keeps that cache (one extra
forward of each finished block appends its keys/values), ``ddpm_uncached`` recomputes the whole clean
prefix at every step; both give the same tokens for one seed (tested, float64).

Within a block the loop is mdlm's (:func:`difflm.families.mdlm.fast.decode_block`): ``remasking``
random (ancestral ddpm, reusing the output while the block is unchanged), low_confidence or threshold;
``steps`` is per block. Prompts work as for mdlm (fixed positions are never masked). The length is not
limited by the trained one: blocks continue with rotary positions (quality past it is not guaranteed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from difflm.families.mdlm.fast import block_bounds, decode_block, subs_log_probs
from difflm.models.backbone import KV
from difflm.sampling.core import SampleOptions, SampleOutput, SamplingError, start_tokens

if TYPE_CHECKING:
    from difflm.families.bd3lm.model import BD3LM

__all__ = ["ddpm", "ddpm_uncached", "run_blockwise"]


def _logp(model: BD3LM, logits: Tensor, ids: Tensor, options: SampleOptions) -> Tensor:
    """SUBS log-probs (N, W, V+1) of backbone logits at ids (N, W), temperature / top-p applied."""
    return subs_log_probs(logits, ids, model.mask_id, options)


def _prefix_mask(a: int, b: int, block_size: int, device: torch.device) -> Tensor:
    """(b, b) mask for [clean prefix 0..a-1, noisy block a..b-1]: block-causal prefix, block sees all."""
    blk = torch.arange(b, device=device) // block_size
    mask = blk[None, :] <= blk[:, None]
    mask[a:, :] = True
    return mask


def run_blockwise(model: BD3LM, x: Tensor, options: SampleOptions, generator: torch.Generator | None, *,
                  cache: bool) -> tuple[Tensor, int]:
    """Fill the masks of x (N, L) block by block; returns the ids and the network calls."""
    bb = model.backbone
    past: KV | None = None
    nfe = 0
    for a, b in block_bounds(x.shape[1], model.block_size):
        pos = torch.arange(a, b, device=x.device)
        if cache:
            def logp_fn(block: Tensor, pos: Tensor = pos) -> Tensor:
                return _logp(model, bb(block, None, positions=pos, past_kv=past), block, options)
        else:
            mask = _prefix_mask(a, b, model.block_size, x.device)

            def logp_fn(block: Tensor, a: int = a, b: int = b, mask: Tensor = mask) -> Tensor:
                ids = torch.cat([x[:, :a], block], dim=1)
                logits = bb(ids, None, positions=torch.arange(b, device=x.device), attn_mask=mask)
                return _logp(model, logits[:, a:], block, options)

        filled, calls = decode_block(model, x[:, a:b], logp_fn, options, generator)
        x = x.clone()
        x[:, a:b] = filled
        nfe += calls
        if cache and b < x.shape[1]:  # append the finished clean block's keys/values (exact: block-causal)
            kv: KV = []
            bb(filled, None, positions=pos, past_kv=past, kv_out=kv)
            nfe += 1
            past = kv if past is None else [(torch.cat([pk, k], 2), torch.cat([pv, v], 2))
                                            for (pk, pv), (k, v) in zip(past, kv)]
    return x, nfe


def _sample(model: BD3LM, options: SampleOptions, generator: torch.Generator | None, *, cache: bool) -> SampleOutput:
    options.validate()
    if options.cache != "none":
        raise SamplingError(f"cache={options.cache!r} is for mdlm; bd3lm's sampler ddpm keeps an exact KV cache of "
                            "finished blocks (sampler ddpm_uncached turns it off): leave cache at none")
    if options.block_length not in (None, model.block_size):
        raise SamplingError(f"bd3lm decodes in its trained blocks of {model.block_size}; leave block_length unset")
    x, fixed = start_tokens(options, model.mask_id, model.device)
    x, nfe = run_blockwise(model, x, options, generator, cache=cache)
    notes = [f"block diffusion: {-(-options.length // model.block_size)} blocks of {model.block_size}, "
             + ("threshold remasking" if options.remasking == "threshold" else f"{options.steps} steps per block")
             + ("" if cache else ", no KV cache")]
    return SampleOutput(tokens=x, fixed=fixed, nfe=nfe, notes=notes)


def ddpm(model: BD3LM, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """Block-by-block masked diffusion with the exact KV cache of finished blocks."""
    return _sample(model, options, generator, cache=True)


def ddpm_uncached(model: BD3LM, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """The same sampler recomputing the clean prefix at every step (the cache's reference)."""
    return _sample(model, options, generator, cache=False)
