"""Fast decoding for masked diffusion: confidence-threshold parallel unmasking and Fast-dLLM's KV caches.

Kept apart from ``samplers.py`` (the ddpm / analytic samplers) so that the block loop and the caches can
be reused by any masked family: :func:`decode_block` is the within-block loop, given only a function
x_block -> log p(x0 | ...) for the block's positions; mdlm drives it with :func:`run_blocks` (optionally
with the approximate prefix/dual caches of Fast-dLLM v1), bd3lm with its exact cache of clean blocks.

Threshold remasking (Fast-dLLM, Wu et al. 2025)
    Each step draws x0 at every mask (exactly as LLaDA's low-confidence step, so both consume the same
    random numbers) and reveals every mask of the block whose drawn token has probability
    strictly above ``threshold``, and at least the most confident mask of each row that still has one.
    A row whose block is full waits (no change) while the other rows finish: the batch stays aligned
    block by block and every row's tokens are those of a run on its own. ``threshold = 1`` reveals one
    token per step: LLaDA's low-confidence sampler with one reveal per step (tested token for token).
Block decoding (LLaDA's semi-autoregressive "block length")
    The sample is split into blocks of ``block_length`` positions decoded left to right; the network
    always sees the whole sample (later blocks still masked); ``steps`` applies per block.
Caches (Fast-dLLM v1, ``cache``: prefix | dual)
    At the first step of every block one full forward gives that step's logits and, per layer, the keys
    and values of every position. The next steps of the block recompute only the block and what comes
    after it (``prefix``: keys/values of the positions before the block reused) or only the block
    (``dual``: those before and after it reused). Approximate: in a bidirectional model the cached
    positions' keys would change as the block fills; they are refreshed once per block.
"""

from __future__ import annotations

import inspect

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from difflm.models.backbone import KV, Backbone
from difflm.sampling.core import SampleOptions, SampleOutput, SamplingError, adjust_log_probs, draw

if TYPE_CHECKING:
    from difflm.families.mdlm.model import MDLM

from difflm.families.mdlm import samplers as ms

__all__ = ["threshold_step", "decode_block", "run_blocks", "block_bounds", "subs_log_probs", "ddpm", "ddpm_cache"]

#: x_block (N, W) -> adjusted log p(x0 | ...) (N, W, V+1) at the block's positions
LogProbFn = Callable[[Tensor], Tensor]


def threshold_step(
    x: Tensor, logp: Tensor, threshold: float, mask_id: int, temperature: float, generator: torch.Generator | None,
) -> tuple[Tensor, bool]:
    """Reveal, per row of x (N, W), every mask whose drawn token has probability > ``threshold`` and at least
    the most confident one (rows without a mask are left as they are). logp: (N, W, V+1) adjusted log-probs.

    The draw is LLaDA's (one x0 per mask, confidence = its log-probability): with a threshold of 1 this is
    ``samplers._low_confidence_step`` revealing one token. Ties go to the leftmost position, as the stable
    sort of the low-confidence step."""
    masked = x == mask_id  # (N, W)
    if not bool(masked.any()):
        return x, False
    lp = logp[masked]  # (M, V+1)
    x0 = draw(lp, temperature, generator)  # (M,)
    conf = torch.full(x.shape, float("-inf"), device=x.device, dtype=lp.dtype)  # (N, W)
    conf[masked] = lp.gather(-1, x0[:, None]).squeeze(-1)
    proposal = torch.full_like(x, mask_id)
    proposal[masked] = x0
    best = torch.zeros_like(masked).scatter_(1, conf.argmax(dim=1, keepdim=True), True) & masked  # (N, W)
    reveal = masked & ((conf.exp() > threshold) | best)  # (N, W)
    return torch.where(reveal, proposal, x), True


def decode_block(
    model: MDLM, x: Tensor, logp_fn: LogProbFn, options: SampleOptions, generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    """Fill the masks of one block x (N, W) with ``options.remasking``; returns the ids and the network calls.

    random / low_confidence: ``options.steps`` steps of ddpm (or LLaDA) on the grid 1 -> eps over this
    block's masks, reusing the last log-probs while the block is unchanged (valid: ``logp_fn`` must not
    depend on time), then the argmax at any mask left. threshold: :func:`threshold_step` until no mask
    is left (at most W calls; ``steps`` unused)."""
    mask_id = model.mask_id
    nfe = 0
    if options.remasking == "threshold":
        while bool((x == mask_id).any()):
            logp = logp_fn(x)
            nfe += 1
            x, _ = threshold_step(x, logp, options.threshold, mask_id, options.temperature, generator)
        return x, nfe
    _low_confidence_step, ddpm_step = ms._low_confidence_step, ms.ddpm_step
    dtype = model.float_dtype()
    times = torch.linspace(1.0, options.eps, options.steps + 1, device=x.device, dtype=dtype)
    move = model.schedule.move_chance(times)  # (T+1,)
    n0 = (x == mask_id).sum(dim=1).to(dtype)  # (N,)
    logp: Tensor | None = None
    for i in range(options.steps):
        if not bool((x == mask_id).any()):
            break
        if logp is None:
            logp = logp_fn(x)
            nfe += 1
        if options.remasking == "low_confidence":
            keep = torch.round(n0 * (move[i + 1] / move[0])).long()
            x, changed = _low_confidence_step(x, logp, keep, mask_id, options.temperature, generator)
        else:
            x, changed = ddpm_step(x, logp, move[i], move[i + 1], mask_id, options.temperature, generator)
        if changed:
            logp = None
    masked = x == mask_id
    if bool(masked.any()):
        if logp is None:
            logp = logp_fn(x)
            nfe += 1
        x = torch.where(masked, logp.argmax(dim=-1), x)
    return x, nfe


def block_bounds(length: int, block: int | None) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive blocks of ``block`` positions over ``length`` (the last may be shorter)."""
    block = block or length
    return [(a, min(a + block, length)) for a in range(0, length, block)]


def subs_log_probs(logits: Tensor, ids: Tensor, mask_id: int, options: SampleOptions) -> Tensor:
    """SUBS log-probs (N, W, V+1) from raw backbone logits at ids (N, W): no mass on the mask id, unmasked
    positions carry their token over; temperature / top-p applied. The cached paths' (mdlm's Fast-dLLM caches,
    bd3lm's exact cache) stand-in for ``MDLM.log_probs``, which runs the whole backbone itself."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.nn.functional.pad(logits[..., :mask_id], (0, 1), value=float("-inf")).log_softmax(-1)
    copy = torch.full_like(logp, float("-inf")).scatter_(-1, ids[..., None], 0.0)
    logp = torch.where((ids != mask_id)[..., None], copy, logp)  # SUBS carry-over
    return adjust_log_probs(logp, options.temperature, options.top_p)


class _Cached:
    """mdlm log-probs at one block's positions, with Fast-dLLM's prefix/dual KV cache refreshed per block."""

    def __init__(self, model: MDLM, x: Tensor, a: int, b: int, kind: str, options: SampleOptions) -> None:
        self.model, self.x, self.a, self.b, self.kind, self.options = model, x, a, b, kind, options
        self.past: KV | None = None

    def _adjust(self, logits: Tensor, ids: Tensor) -> Tensor:
        return subs_log_probs(logits, ids, self.model.mask_id, self.options)

    def __call__(self, block: Tensor) -> Tensor:
        model, a, b = self.model, self.a, self.b
        bb: Backbone = model.backbone
        full = self.x.clone()
        full[:, a:b] = block
        if self.past is None:  # first step of the block: full forward, keep every position's keys/values
            kv: KV = []
            logits = bb(full, None, kv_out=kv)  # (N, L, V+1)
            if self.kind == "prefix":
                self.past = [(k[:, :, :a], v[:, :, :a]) for k, v in kv]
            else:  # dual: before and after the block (key order does not matter without a mask)
                self.past = [(torch.cat([k[:, :, :a], k[:, :, b:]], 2), torch.cat([v[:, :, :a], v[:, :, b:]], 2))
                             for k, v in kv]
            return self._adjust(logits[:, a:b], block)
        end = full.shape[1] if self.kind == "prefix" else b
        ids = full[:, a:end]
        pos = torch.arange(a, end, device=full.device)
        logits = bb(ids, None, positions=pos, past_kv=self.past)  # (N, end - a, V+1)
        return self._adjust(logits[:, : b - a], block)


def run_blocks(
    model: MDLM, x: Tensor, options: SampleOptions, generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    """Fill the masks of x (N, L) block by block (``options.block_length``; one block if None) with
    ``options.remasking`` and ``options.cache``; returns the ids and the network calls (full or partial)."""
    if model.time_conditioning:
        raise SamplingError(
            "threshold remasking, block_length and cache need a model without time conditioning "
            "(model.time_conditioning: false): they reuse outputs across steps of unknown time")
    if options.cache != "none" and "past_kv" not in inspect.signature(model.backbone.forward).parameters:
        raise SamplingError(f"cache={options.cache!r} needs a backbone whose forward takes positions / past_kv / "
                            f"kv_out (mdlm's and bijective's do); {type(model.backbone).__name__} of family "
                            f"{model.name!r} does not: use cache none")
    nfe = 0
    for a, b in block_bounds(x.shape[1], options.block_length):
        if not bool((x[:, a:b] == model.mask_id).any()):
            continue
        if options.cache == "none":
            def logp_fn(block: Tensor, a: int = a, b: int = b) -> Tensor:
                full = x.clone()
                full[:, a:b] = block
                return adjust_log_probs(model.log_probs(full, torch.zeros(full.shape[0], device=full.device))[:, a:b],
                                        options.temperature, options.top_p)
        else:
            logp_fn = _Cached(model, x, a, b, options.cache, options)
        filled, calls = decode_block(model, x[:, a:b], logp_fn, options, generator)
        x = x.clone()
        x[:, a:b] = filled
        nfe += calls
    return x, nfe


def ddpm(model: MDLM, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """mdlm's ddpm sampler, with threshold remasking, block decoding and caches routed to :func:`run_blocks`."""
    return ms._sample(model, options, generator, kind="ddpm", runner=run_blocks)


def ddpm_cache(model: MDLM, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """mdlm's ddpm_cache sampler, with the same routing as :func:`ddpm`."""
    return ms._sample(model, options, generator, kind="ddpm_cache", runner=run_blocks)
