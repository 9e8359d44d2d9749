"""SEDD's samplers: ``euler`` and ``analytic`` (Tweedie tau-leaping), each ending with the denoising step.

Both walk the grid ``linspace(t_start, eps, steps + 1)`` from the graph's limit (all MASK, or uniform
random tokens) at every position not fixed by a prompt, then take one denoising step at t = eps
(a draw from the Tweedie denoiser at sigma(eps); for absorb the MASK column is dropped, so no mask
is left). Reference: louaaron/Score-Entropy-Discrete-Diffusion ``sampling.py`` (the maths, not its code).

euler     one step t -> t - dt jumps from x to y with probability dt * sigma'(t) * (Q^T-weighted score)_y.
analytic  one step draws from the staggered score times the transposed transition over
          dsigma = sigma(t) - sigma(t - dt): exact for one token changing, per position.

Each step is split into *whether* a position moves (its exact probability) and *where to*: temperature
and top-p (:func:`difflm.sampling.core.adjust_log_probs`) act on the where-to distribution only, so they
change which token is revealed but never the reveal schedule; at temperature 1 and top-p 1 the step is
exactly the reference's categorical. The denoising step is the posterior over x0, adjusted as a whole.

Prompts and ``[MASK:n]`` infilling (:mod:`difflm.sampling.prompting`): fixed positions start from the
template and are written back after every step (the reference's conditional sampler does the same);
with absorb they never change anyway, with uniform the projection is what holds them. Samples longer
than ``options.window`` are made in semi-autoregressive windows (:func:`difflm.families.mdlm.samplers.window_starts`).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from difflm.sampling.core import (
    SampleOptions,
    SampleOutput,
    adjust_log_probs,
    draw,
    reject_unsupported,
    start_tokens,
)
from difflm.families.mdlm.samplers import window_starts
from difflm.families.sedd.graphs import Graph
from difflm.schedules import NoiseSchedule


class ScoreModel(Protocol):
    """What these samplers need of a score-entropy model (the sedd family): a protocol, so this module never
    names the model class that uses it."""

    graph: Graph
    schedule: NoiseSchedule
    vocab_size: int

    @property
    def mask_id(self) -> int | None: ...

    @property
    def device(self) -> torch.device: ...

    def float_dtype(self) -> torch.dtype: ...

    def log_score(self, xt: Tensor, sigma: Tensor) -> Tensor: ...

__all__ = ["ScoreModel", "euler", "analytic", "run", "denoise_argmax", "MIN_T"]

Kind = Literal["euler", "analytic"]
#: the smallest time the network is queried at (sigma(0) may be 0, where the absorb score is infinite)
MIN_T = 1e-5


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _move(
    x: Tensor, weights: Tensor, stay: Tensor, options: SampleOptions, generator: torch.Generator | None
) -> Tensor:
    """One jump decision per row: rows (M,) in state x move with probability W / (W + stay), W = sum(weights),
    to a draw from weights (M, dim) (0 at x) adjusted by temperature / top-p; the others keep x."""
    total = weights.sum(dim=-1)  # (M,)
    p_move = torch.where(total + stay > 0, total / (total + stay).clamp_min(1e-300), 0.0)  # (M,)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=p_move.dtype)  # (M,)
    moving = u < p_move  # (M,)
    if not bool(moving.any()):
        return x
    logw = weights[moving].log()  # (k, dim); -inf where the weight is 0 (never drawn)
    logw = adjust_log_probs(logw.log_softmax(dim=-1), options.temperature, options.top_p)
    x = x.clone()
    x[moving] = draw(logw, options.temperature, generator)
    return x


def _active(model: ScoreModel, x: Tensor, hold: Tensor) -> Tensor:
    """Positions (N, L) a step may change: not held, and (absorb) still masked."""
    free = ~hold
    return free & (x == model.mask_id) if model.graph.absorb else free


def run(
    model: ScoreModel, x: Tensor, hold: Tensor, options: SampleOptions, generator: torch.Generator | None, *,
    kind: Kind, t_start: float = 1.0,
) -> tuple[Tensor, int]:
    """Sample from x (N, L) at time ``t_start``: ``options.steps`` steps of ``kind`` to ``options.eps``,
    then the denoising step. ``hold`` (N, L) positions keep their value in x throughout. Returns the ids
    (N, L) and the number of network calls."""
    n = x.shape[0]
    dtype = model.float_dtype()
    wide = _wide(x.device)
    kept = x.clone()
    times = torch.linspace(max(t_start, MIN_T), options.eps, options.steps + 1, device=x.device, dtype=dtype)
    sigmas = model.schedule.sigma(times)  # (T+1,)
    nfe = 0
    for i in range(options.steps):
        active = _active(model, x, hold)  # (N, L)
        if not bool(active.any()):
            break
        score = model.log_score(x, sigmas[i].expand(n))[active].to(wide).exp()  # (M, dim)
        xa = x[active]  # (M,)
        if kind == "euler":
            dt = times[i] - times[i + 1]
            rate = (dt * model.schedule.dsigma(times[i])).to(wide).expand(xa.shape[0])  # (M,)
            weights = model.graph.move_weights(xa, score, rate)  # (M, dim), 0 at x
            stay = (1 - weights.sum(dim=-1)).clamp_min(0.0)  # (M,)
        else:
            dsig = (sigmas[i] - sigmas[i + 1]).to(wide).expand(xa.shape[0])  # (M,)
            probs = model.graph.tweedie(xa, score, dsig)  # (M, dim)
            stay = probs.gather(-1, xa[:, None]).squeeze(-1)  # (M,)
            weights = probs.scatter(-1, xa[:, None], 0.0)
        nfe += 1
        x = x.clone()
        x[active] = _move(xa, weights, stay, options, generator)
        x = torch.where(hold, kept, x)
    active = _active(model, x, hold)
    if bool(active.any()):  # the denoising step: a draw from p(x0 | x_eps)
        probs = _denoiser(model, x, active, sigmas[-1].expand(n))  # (M, V)
        nfe += 1
        logp = adjust_log_probs(probs.log().log_softmax(dim=-1), options.temperature, options.top_p)
        x = x.clone()
        x[active] = draw(logp, options.temperature, generator)
    return torch.where(hold, kept, x), nfe


def _denoiser(model: ScoreModel, x: Tensor, active: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie denoiser probabilities (M, V) over the real tokens at the ``active`` positions of x (N, L)."""
    wide = _wide(x.device)
    score = model.log_score(x, sigma)[active].to(wide).exp()  # (M, dim)
    rows_sigma = sigma.to(wide)[:, None].expand_as(active)[active]  # (M,)
    probs = model.graph.tweedie(x[active], score, rows_sigma)[:, : model.vocab_size]  # (M, V)
    return probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-300)


@torch.no_grad()
def denoise_argmax(model: ScoreModel, xt: Tensor, hold: Tensor, t: float) -> Tensor:
    """The most likely id of the Tweedie denoiser at sigma(t) at every position not held; (B, L)."""
    n = xt.shape[0]
    tt = torch.full((n,), t, device=xt.device, dtype=model.float_dtype())
    active = _active(model, xt, hold)
    out = xt.clone()
    if bool(active.any()):
        out[active] = _denoiser(model, xt, active, model.schedule.sigma(tt)).argmax(dim=-1)
    return out


def _sample(model: ScoreModel, options: SampleOptions, generator: torch.Generator | None, kind: Kind) -> SampleOutput:
    options.validate()
    reject_unsupported(options, kind)  # prompts, temperature and top-p: yes; low-confidence remasking: no
    device = model.device
    fill = model.mask_id if model.graph.absorb else 0
    x, fixed = start_tokens(options, fill, device)  # (N, L) each
    if not model.graph.absorb:  # the uniform limit at every free position
        x = torch.where(fixed, x, model.graph.limit(x.shape, generator, device))
    window = options.window or options.length
    stride = options.stride or max(1, window // 2)
    starts = window_starts(options.length, window, stride)
    notes: list[str] = []
    if len(starts) > 1:
        notes.append(
            f"semi-autoregressive: {options.length} tokens in {len(starts)} windows of {window} "
            f"(stride {stride}), {options.steps} steps each"
        )
    hold = fixed.clone()
    nfe = 0
    for a in starts:
        part, calls = run(model, x[:, a:a + window], hold[:, a:a + window], options, generator, kind=kind)
        x[:, a:a + window] = part
        hold[:, a:a + window] = True  # generated tokens are the next window's fixed context
        nfe += calls
    return SampleOutput(tokens=x, fixed=fixed, nfe=nfe, notes=notes)


def euler(model: ScoreModel, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """SEDD's Euler sampler (reverse-rate steps) with the final denoising step."""
    return _sample(model, options, generator, "euler")


def analytic(model: ScoreModel, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """SEDD's analytic (Tweedie tau-leaping) sampler with the final denoising step."""
    return _sample(model, options, generator, "analytic")

