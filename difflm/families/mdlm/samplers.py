"""MDLM samplers: ``ddpm``, ``ddpm_cache`` and ``analytic``, with LLaDA-style low-confidence
remasking and semi-autoregressive windows for text longer than the trained length.

All of them start from masks at every position that is not fixed by a prompt and walk the time
grid ``linspace(t_start, eps, steps + 1)``; tokens that are not masks are never changed (SUBS
carry-over), which is what makes prompts and infilling work without extra machinery.

ddpm
    MDLM's ancestral sampler. Per step t -> s, each mask is revealed with probability
    ``(move(t) - move(s)) / move(t)`` and, if revealed, takes a draw from p(x0 | x_t). Masks
    left at t = eps are filled by the argmax (MDLM's noise removal).

    Draw order (identical in both ddpm variants, so they give identical tokens for one seed):
    per step, first the uniforms (N, L) that decide which masks are revealed, then one
    categorical draw per *revealed* position only. Drawing x0 only where it is used is exact
    (the draws are independent) and makes a step in which nothing changes almost free.
ddpm_cache
    ddpm that reuses the network output while no token changed. Valid only without time
    conditioning: then p(x0 | x_t) depends on x_t alone. With time conditioning the output
    changes every step, so the sampler runs plain ddpm and says so in ``notes``. The cache is
    per batch (MDLM's): the network runs on the whole batch whenever any row changed, because
    running a subset of rows is not bit-identical to the full batch (matmul blocking depends
    on the batch size) and would break "same tokens as ddpm". With T much larger than L most
    steps change nothing for small batches; with many samples per batch the saving shrinks.
analytic
    The Tweedie tau-leaping update of SEDD as implemented in MDLM (``_analytic_update``):
    the concrete score of absorbing diffusion, its staggered form and the transposed
    transition give one categorical over the V ids plus "stay masked". For absorbing noise
    its reveal probability equals ddpm's (tested); it differs in drawing a single categorical
    per position and in its last step, a draw from the denoiser instead of an argmax.
Remasking ``low_confidence`` (LLaDA, Nie et al. 2025; ddpm and ddpm_cache)
    Each step draws x0 at every mask, then reveals the k masks whose drawn token is most
    probable, where k keeps the masked count on the schedule: ``round(n0 * move(s) / move(t_start))``
    masks remain after the step. Deterministic count, confidence-ordered positions.
Semi-autoregressive windows (``options.window``)
    A sample longer than the trained length is made window by window (MDLM's semi-AR sampler):
    the first window samples ``window`` tokens; each next one shifts by ``stride`` tokens,
    keeps the overlap as fixed context and samples the ``stride`` new tokens at its end. The
    last window is aligned to the end of the sample. ``steps`` is per window.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from difflm.sampling.core import (
    SampleOptions,
    SampleOutput,
    SamplingError,
    adjust_log_probs,
    draw,
    sample_categorical,
    start_tokens,
)
from difflm.schedules import NoiseSchedule


class MaskedModel(Protocol):
    """What these samplers need of a masked-diffusion model (mdlm, bijective, or any family with the same
    SUBS denoiser): a protocol, so this module never names the model class that uses it."""

    mask_id: int
    schedule: NoiseSchedule
    time_conditioning: bool

    @property
    def device(self) -> torch.device: ...

    def float_dtype(self) -> torch.dtype: ...

    def log_probs(self, xt: Tensor, sigma: Tensor) -> Tensor: ...

__all__ = ["MaskedModel", "ddpm", "ddpm_cache", "analytic", "run_ddpm", "run_analytic", "window_starts", "ddpm_step",
           "analytic_transition"]


# ---- one ddpm step ------------------------------------------------------------------------------


def ddpm_step(
    x: Tensor, logp: Tensor, move_t: Tensor, move_s: Tensor, mask_id: int, temperature: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, bool]:
    """Ancestral step x_t (N, L) -> x_s (N, L) given adjusted log p(x0 | x_t) (N, L, V+1).

    move_t, move_s: masking probabilities at t and s, scalars or (N, 1). A mask is revealed with
    probability (move_t - move_s) / move_t and then takes a draw from ``logp``; other ids are
    copied. Returns the new ids and whether any id changed (one host sync)."""
    masked = x == mask_id  # (N, L)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.promote_types(move_t.dtype, torch.float32))
    reveal = masked & (u < (move_t - move_s) / move_t)  # (N, L)
    if not bool(reveal.any()):
        return x, False
    x = x.clone()
    x[reveal] = draw(logp[reveal], temperature, generator)  # draws only where revealed: (k,)
    return x, True


def _low_confidence_step(
    x: Tensor, logp: Tensor, keep_masked: Tensor, mask_id: int, temperature: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, bool]:
    """LLaDA step: draw x0 at every mask, reveal the most confident ones until ``keep_masked`` (N,) remain."""
    masked = x == mask_id  # (N, L)
    n_masked = masked.sum(dim=1)  # (N,)
    reveal_count = (n_masked - keep_masked).clamp(min=0)  # (N,)
    if not bool(masked.any()):
        return x, False
    lp = logp[masked]  # (M, V+1)
    x0 = draw(lp, temperature, generator)  # (M,)
    conf = torch.full(x.shape, float("-inf"), device=x.device, dtype=lp.dtype)  # (N, L)
    conf[masked] = lp.gather(-1, x0[:, None]).squeeze(-1)  # log-prob of each drawn token
    proposal = torch.full_like(x, mask_id)
    proposal[masked] = x0
    order = conf.argsort(dim=1, descending=True, stable=True)  # (N, L), most confident first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
    reveal = masked & (rank < reveal_count[:, None])  # (N, L)
    if not bool(reveal.any()):
        return x, False
    return torch.where(reveal, proposal, x), True


# ---- the ddpm loop over one window --------------------------------------------------------------


def run_ddpm(
    model: MaskedModel, x: Tensor, options: SampleOptions, generator: torch.Generator | None, *,
    cache: bool, t_start: float = 1.0,
) -> tuple[Tensor, int]:
    """Fill the masks of x (N, L) with ``options.steps`` ddpm steps from ``t_start`` to ``options.eps``.

    cache: reuse p(x0 | x_t) while x is unchanged (caller checks time conditioning). Returns the
    filled ids (N, L) and the number of network calls."""
    n = x.shape[0]
    dtype = model.float_dtype()
    times = torch.linspace(t_start, options.eps, options.steps + 1, device=x.device, dtype=dtype)  # (T+1,)
    move = model.schedule.move_chance(times)  # (T+1,)
    low_conf = options.remasking == "low_confidence"
    n0 = (x == model.mask_id).sum(dim=1).to(dtype)  # (N,) masks at the start
    logp: Tensor | None = None
    nfe = 0
    for i in range(options.steps):
        if not bool((x == model.mask_id).any()):
            break  # everything revealed (both variants stop at the same step)
        if logp is None or not cache:
            sigma = model.schedule.sigma(times[i]).expand(n)  # (N,)
            logp = adjust_log_probs(model.log_probs(x, sigma), options.temperature, options.top_p)  # (N, L, V+1)
            nfe += 1
        if low_conf:
            keep = torch.round(n0 * (move[i + 1] / move[0])).long()  # (N,) masks left after this step
            x, changed = _low_confidence_step(x, logp, keep, model.mask_id, options.temperature, generator)
        else:
            x, changed = ddpm_step(x, logp, move[i], move[i + 1], model.mask_id, options.temperature, generator)
        if changed:
            logp = None
    masked = x == model.mask_id  # (N, L)
    if bool(masked.any()):  # noise removal: argmax of the last prediction at the masks left
        if logp is None or not cache:
            sigma = model.schedule.sigma(times[-1]).expand(n)
            logp = adjust_log_probs(model.log_probs(x, sigma), options.temperature, options.top_p)
            nfe += 1
        x = torch.where(masked, logp.argmax(dim=-1), x)
    return x, nfe


# ---- analytic (Tweedie tau-leaping) -------------------------------------------------------------


def analytic_transition(p_x0: Tensor, sigma_t: Tensor, sigma_s: Tensor) -> Tensor:
    """Reverse transition probabilities (M, V+1) of masked positions from sigma_t to sigma_s < sigma_t.

    p_x0: (M, V+1) probabilities of the clean id at the masked positions, 0 in the mask column (last).
    Follows MDLM's ``get_score`` / ``_staggered_score`` / ``_transp_transition`` for x = mask:
    score_y = p(y) * k with k = e^-sigma / (1 - e^-sigma) for y != mask, score_mask = 1; the staggered
    score multiplies by e^dsigma and adds (1 - e^dsigma) * sum(score) to the mask entry; the transposed
    transition from the mask is (1 - e^-dsigma) everywhere plus e^-dsigma on the mask. Float64
    (float32 on MPS, which has no float64)."""
    dtype = torch.float32 if p_x0.device.type == "mps" else torch.float64
    p = p_x0.to(dtype)
    st, ss = sigma_t.to(dtype), sigma_s.to(dtype)
    dsigma = st - ss
    k = torch.exp(-st) / -torch.expm1(-st)
    score = p * k  # (M, V+1); mask column is 0 here
    score[:, -1] = 1.0
    total = score.sum(dim=-1)  # (M,)
    stag = score * torch.exp(dsigma)
    stag[:, -1] += -torch.expm1(dsigma) * total
    edge = (-torch.expm1(-dsigma)).expand_as(stag).clone()  # (M, V+1)
    edge[:, -1] += torch.exp(-dsigma)
    return (stag * edge).clamp_min(0.0)  # (M, V+1)


def run_analytic(
    model: MaskedModel, x: Tensor, options: SampleOptions, generator: torch.Generator | None, *, t_start: float = 1.0,
) -> tuple[Tensor, int]:
    """Fill the masks of x (N, L) with ``options.steps`` analytic steps, then one denoiser draw at eps."""
    n = x.shape[0]
    dtype = model.float_dtype()
    times = torch.linspace(t_start, options.eps, options.steps + 1, device=x.device, dtype=dtype)  # (T+1,)
    sigmas = model.schedule.sigma(times)  # (T+1,)
    nfe = 0
    for i in range(options.steps):
        masked = x == model.mask_id  # (N, L)
        if not bool(masked.any()):
            break
        logp = adjust_log_probs(model.log_probs(x, sigmas[i].expand(n)), options.temperature, options.top_p)
        nfe += 1
        probs = analytic_transition(logp[masked].exp(), sigmas[i], sigmas[i + 1])  # (M, V+1)
        if options.temperature == 0.0:  # greedy: reveal with the posterior probability, as the argmax id
            reveal = torch.rand(probs.shape[0], generator=generator, device=x.device, dtype=probs.dtype)
            reveal = reveal < 1 - probs[:, -1]
            new = torch.where(reveal, probs[:, :-1].argmax(dim=-1), model.mask_id)
        else:
            new = sample_categorical(probs.log(), generator)  # (M,) ids or mask_id (stay masked)
        x = x.clone()
        x[masked] = new
    masked = x == model.mask_id
    if bool(masked.any()):  # denoiser step: a draw from p(x0 | x_eps) (the mask has probability 0)
        logp = adjust_log_probs(model.log_probs(x, sigmas[-1].expand(n)), options.temperature, options.top_p)
        nfe += 1
        x = x.clone()
        x[masked] = draw(logp[masked], options.temperature, generator)
    return x, nfe


# ---- windows and the public samplers ------------------------------------------------------------


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start positions of the semi-AR windows over ``length`` tokens; the last one ends at ``length``."""
    if length <= window:
        return [0]
    starts = [0]
    while starts[-1] + window < length:
        starts.append(min(starts[-1] + stride, length - window))
    return starts


def _sample(model: MaskedModel, options: SampleOptions, generator: torch.Generator | None, *, kind: str,
            runner: Callable[..., tuple[Tensor, int]] | None = None) -> SampleOutput:
    """runner: fast.run_blocks, passed by the wrappers in fast.py (threshold / block decoding / caches)."""
    options.validate()
    notes: list[str] = []
    cache = kind == "ddpm_cache"
    if cache and model.time_conditioning:
        cache = False
        notes.append(
            "ddpm_cache: this model is time-conditioned (model.time_conditioning: true), so its output changes "
            "every step even when no token does; ran plain ddpm (same tokens, no caching)"
        )
    x, fixed = start_tokens(options, model.mask_id, model.device)  # (N, L) each
    window = options.window or options.length
    stride = options.stride or max(1, window // 2)
    starts = window_starts(options.length, window, stride)
    if len(starts) > 1:
        notes.append(
            f"semi-autoregressive: {options.length} tokens in {len(starts)} windows of {window} "
            f"(stride {stride}), {options.steps} steps each"
        )
    fast = options.remasking == "threshold" or options.block_length is not None or options.cache != "none"
    if fast and runner is None:
        raise SamplingError("threshold remasking, block_length and cache run through difflm.families.mdlm.fast "
                            "(the family's samplers() entries); this sampler function does not do them")
    nfe = 0
    for a in starts:
        part = x[:, a:a + window]  # (N, W)
        if fast:
            assert runner is not None
            filled, calls = runner(model, part, options, generator)
        elif kind == "analytic":
            filled, calls = run_analytic(model, part, options, generator)
        else:
            filled, calls = run_ddpm(model, part, options, generator, cache=cache)
        x[:, a:a + window] = filled
        nfe += calls
    return SampleOutput(tokens=x, fixed=fixed, nfe=nfe, notes=notes)


def ddpm(model: MaskedModel, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """MDLM's ancestral sampler, one network call per step (see the module docstring)."""
    return _sample(model, options, generator, kind="ddpm")


def ddpm_cache(model: MaskedModel, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """ddpm reusing the network output while no token changes; same tokens as :func:`ddpm` for one seed."""
    return _sample(model, options, generator, kind="ddpm_cache")


def analytic(model: MaskedModel, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """SEDD/MDLM's analytic (Tweedie tau-leaping) sampler; no low-confidence remasking."""
    if options.remasking != "random":
        raise SamplingError(f"remasking={options.remasking} works with the ddpm and ddpm_cache samplers, not analytic")
    if options.block_length is not None or options.cache != "none":
        raise SamplingError("block_length and cache work with the ddpm and ddpm_cache samplers, not analytic")
    return _sample(model, options, generator, kind="analytic")
