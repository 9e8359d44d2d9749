"""Discrete-time Gaussian noise schedules (DDPM), for continuous-embedding diffusion (``diffusion_lm``).

A schedule is a table over T steps ``t = 0 .. T-1`` (``t = 0`` is the first, least noisy step):
``x_t = sqrt(alpha_bar[t]) x_start + sqrt(1 - alpha_bar[t]) eps``. Every table is float64 and
computed once on the CPU, then sanity-checked (betas in (0, 0.999], ``alpha_bar`` strictly
decreasing in (0, 1]); a bad schedule raises ``ValueError`` at build time rather than giving NaNs
mid-training.

Named schedules (the formulas of Ho et al. 2020, Nichol & Dhariwal 2021 and Li et al. 2022):

* ``sqrt``   (Diffusion-LM's default): ``alpha_bar(s) = 1 - sqrt(s + 1e-4)``, s = t/T in [0, 1];
  noise rises sharply in the first steps, so even small t corrupts the embeddings meaningfully.
* ``cosine`` (improved DDPM): ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi/2)^2``.
* ``linear`` (DDPM): betas linear from 1e-4 to 0.02, rescaled by 1000/T so any T spans the same
  amount of noise.

For ``sqrt`` and ``cosine`` the betas are ``1 - alpha_bar((t+1)/T) / alpha_bar(t/T)``; every beta
(of every schedule) is clipped at 0.999 so the last steps never divide by zero (``sqrt``'s
``alpha_bar(1)`` is even negative, so its last beta is exactly the clip). The tabulated
``alpha_bar`` is then the cumulative product of ``1 - beta``.

Tables stay plain tensors (never module buffers), so casting a model to bf16 never rounds them;
:meth:`GaussianSchedule.on` hands out per-device copies (float32 on MPS, which has no float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

#: names accepted by the diffusion_lm family, default first
GAUSSIAN_SCHEDULES: tuple[str, ...] = ("sqrt", "cosine", "linear")

MAX_BETA = 0.999


def _betas_from_alpha_bar(alpha_bar: Callable[[Tensor], Tensor], T: int) -> Tensor:
    """(T,) float64 betas discretising a continuous alpha_bar(s), s in [0, 1], clipped at MAX_BETA."""
    s = torch.arange(T + 1, dtype=torch.float64) / T  # (T+1,)
    ab = alpha_bar(s)  # (T+1,)
    return (1 - ab[1:] / ab[:-1]).clamp(max=MAX_BETA)  # (T,)


def _sqrt_betas(T: int) -> Tensor:
    return _betas_from_alpha_bar(lambda s: 1 - torch.sqrt(s + 1e-4), T)


def _cosine_betas(T: int) -> Tensor:
    return _betas_from_alpha_bar(lambda s: torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2, T)


def _linear_betas(T: int) -> Tensor:
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=MAX_BETA)


_BETAS: dict[str, Callable[[int], Tensor]] = {"sqrt": _sqrt_betas, "cosine": _cosine_betas, "linear": _linear_betas}


@dataclass(frozen=True)
class PosteriorCoefs:
    """q(x_s | x_t, x_start) = N(coef_x0 * x_start + coef_xt * x_t, var) for s < t (any stride)."""

    coef_x0: Tensor
    coef_xt: Tensor
    var: Tensor


def posterior_coefs(ab_t: Tensor, ab_s: Tensor) -> PosteriorCoefs:
    """Posterior of the earlier latent x_s given x_t and x_start, from alpha_bar at t and at s < t.

    With alpha = ab_t / ab_s and beta = 1 - alpha (the effective one-jump beta), the standard
    DDPM posterior is mean = sqrt(ab_s) beta / (1 - ab_t) x_start + sqrt(alpha) (1 - ab_s) / (1 - ab_t) x_t
    and var = beta (1 - ab_s) / (1 - ab_t). With s = t - 1 this is the per-step table; with a
    stride it is the respaced sampler's step. ``ab_s = 1`` (s before the chain) gives var 0 and
    mean x_start. Works on any broadcastable shapes, in the dtype of the inputs.
    """
    alpha = ab_t / ab_s
    beta = 1 - alpha
    one_m_t = 1 - ab_t
    return PosteriorCoefs(
        coef_x0=ab_s.sqrt() * beta / one_m_t,
        coef_xt=alpha.sqrt() * (1 - ab_s) / one_m_t,
        var=beta * (1 - ab_s) / one_m_t,
    )


@dataclass
class GaussianSchedule:
    """Float64 tables (T,) of one named schedule; index them with integer steps t in [0, T)."""

    name: str
    T: int
    betas: Tensor
    alpha_bar: Tensor = field(init=False)
    alpha_bar_prev: Tensor = field(init=False)
    sqrt_alpha_bar: Tensor = field(init=False)
    sqrt_one_minus_alpha_bar: Tensor = field(init=False)
    posterior_var: Tensor = field(init=False)
    posterior_log_var_clipped: Tensor = field(init=False)
    posterior_coef_x0: Tensor = field(init=False)
    posterior_coef_xt: Tensor = field(init=False)
    bound_weight: Tensor = field(init=False)
    bound_proposal: Tensor = field(init=False)
    bound_proposal_cdf: Tensor = field(init=False)
    _cache: dict[tuple[str, torch.device], Tensor] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        betas = self.betas
        if betas.dtype != torch.float64 or betas.shape != (self.T,):
            raise ValueError(f"betas must be float64 of shape ({self.T},), got {betas.dtype} {tuple(betas.shape)}")
        if not torch.all(torch.isfinite(betas)) or not torch.all((betas > 0) & (betas <= MAX_BETA)):
            raise ValueError(f"{self.name}: every beta must be in (0, {MAX_BETA}]")
        ab = torch.cumprod(1 - betas, dim=0)  # (T,)
        if not (torch.all(ab > 0) and torch.all(ab <= 1) and torch.all(ab[1:] < ab[:-1])):
            raise ValueError(f"{self.name}: alpha_bar must be strictly decreasing in (0, 1]")
        self.alpha_bar = ab
        self.alpha_bar_prev = torch.cat([ab.new_ones(1), ab[:-1]])  # (T,): 1 before the chain
        self.sqrt_alpha_bar = ab.sqrt()
        self.sqrt_one_minus_alpha_bar = (1 - ab).sqrt()
        post = posterior_coefs(ab, self.alpha_bar_prev)
        self.posterior_var = post.var  # (T,); exactly 0 at t = 0
        # log variance with t=0 replaced by t=1's value (as DDPM): the t=0 step adds no noise anyway.
        clipped = torch.cat([post.var[1:2], post.var[1:]]) if self.T > 1 else self.betas.clone()
        self.posterior_log_var_clipped = clipped.log()
        self.posterior_coef_x0 = post.coef_x0
        self.posterior_coef_xt = post.coef_xt
        # Weight of ||x_start - x0_hat||^2 (summed over dims) in the step-t term of the variational bound,
        # with the reverse variance fixed to the posterior's: coef_x0^2 / (2 var) = (SNR(t-1) - SNR(t)) / 2
        # for t >= 1; at t = 0 the decoder p(x_start | x_0) = N(x0_hat, beta_0 I) gives 1 / (2 beta_0).
        weight = 0.5 * post.coef_x0**2 / post.var.clamp(min=torch.finfo(torch.float64).tiny)
        weight[0] = 0.5 / betas[0]
        self.bound_weight = weight
        # Importance distribution of t for estimating the bound: each step's share of the bound if x_start
        # were unit Gaussian (mmse per dim 1 / (1 + SNR)). Puts most draws on the first steps, whose weights
        # are huge; measured ~10x lower std of the estimate than uniform t on a trained tiny model.
        proposal = weight / (1 + ab / (1 - ab))
        self.bound_proposal = proposal / proposal.sum()
        self.bound_proposal_cdf = torch.cumsum(self.bound_proposal, 0)

    def on(self, table: str, device: torch.device) -> Tensor:
        """Table ``table`` (an attribute name) on ``device``, cached; float32 on MPS (no float64 there)."""
        key = (table, torch.device(device))
        if key not in self._cache:
            dtype = torch.float32 if key[1].type == "mps" else torch.float64
            self._cache[key] = getattr(self, table).to(device=key[1], dtype=dtype)
        return self._cache[key]

    def snr(self) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar), (T,) float64, strictly decreasing."""
        return self.alpha_bar / (1 - self.alpha_bar)

    def __repr__(self) -> str:
        return f"GaussianSchedule({self.name!r}, T={self.T})"


def get_gaussian_schedule(name: str, T: int) -> GaussianSchedule:
    """Schedule ``name`` tabulated over ``T`` steps; ValueError for an unknown name or T < 1."""
    if name not in _BETAS:
        raise ValueError(f"unknown Gaussian schedule {name!r}; choose one of {', '.join(GAUSSIAN_SCHEDULES)}")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    return GaussianSchedule(name, T, _BETAS[name](T))
