"""Diffusion-LM samplers: ancestral sampling with x0-prediction, with and without the clamping trick.

ancestral
    From x_{T-1} ~ N(0, I), each step t -> s (s < t, on the strided grid of
    :meth:`DiffusionLM.sampling_steps`) predicts x0_hat = f(x_t, t/T) and draws x_s from the
    Gaussian posterior q(x_s | x_t, x0_hat) (exact for any stride). The last step returns x0_hat
    itself, which is rounded to tokens: the argmax of the tied decoder logits x0_hat @ EMB^T.
ancestral_clamp
    The same with the clamping trick of Li et al. (2022): x0_hat is snapped to its nearest word
    embedding (L2) at every step before the posterior step, so the chain commits to tokens early.

The default (``FamilySpec.default_sampler`` in the package's registry entry) follows the run's ``diffusion.clamp_sampling``:
``ancestral`` when it is off (the config default), ``ancestral_clamp`` when it is on, so
``difflm sample`` draws the same kind of samples as training logged.

What the options mean for a continuous family (no categorical draw anywhere):

* ``temperature`` scales the standard deviation of the noise each reverse step adds, keeping the
  marginal variance of x_s right (the DDIM family of samplers, Song et al. 2021, with
  eta = temperature): x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z with
  sigma = temperature * sqrt(posterior variance) and eps_hat the noise implied by x_t and x0_hat.
  1 is exactly the ancestral (DDPM) posterior step; 0 is the deterministic DDIM update (the
  sample then depends only on the starting noise x_{T-1}, which is never scaled, so the samples
  of one batch still differ); values above 1 add extra noise (the eps_hat term is cut at 0).
* ``top_p`` has no meaning (rounding is an argmax, not a draw) and is rejected unless it is 1.
* Prompts (a prefix, or inline ``[MASK:n]`` spans to infill) use the inpainting trick: before
  every network call the x_t rows of fixed positions are replaced by the prompt tokens' clean
  embeddings noised to step t exactly as in training (x_start ~ N(EMB(w), beta_0 I), then
  q(x_t | x_start): mean sqrt(ab_t) EMB(w), variance 1 - ab_t ab_0, a fresh draw each step),
  and the final rounding is forced to the prompt tokens, so they never change.
* ``steps`` is capped at T; ``remasking`` and semi-autoregressive windows (``--block``) are
  mdlm's and are rejected. A sample longer than the trained length is made in one piece
  (the DiT backbone has rotary positions) with a note.

Draw order for one seed: x_{T-1}, then per step the inpainting noise (only when prompted) and the
posterior noise (only when a noise is added). The unprompted ``ancestral`` at temperature 1 draws
exactly like :meth:`DiffusionLM.sample` (which runs this loop), so both give the same tokens.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from difflm.families.diffusion_lm.gaussian import GaussianSchedule, posterior_coefs
from difflm.sampling.core import SampleOptions, SampleOutput, SamplingError, reject_unsupported, start_tokens


class EmbeddingModel(Protocol):
    """What these samplers need of a Gaussian embedding-diffusion model (the diffusion_lm family): a protocol,
    so this module never names the model class that uses it."""

    T: int
    embed_dim: int
    schedule: GaussianSchedule
    embed: Callable[..., Tensor]

    @property
    def device(self) -> torch.device: ...

    def float_dtype(self) -> torch.dtype: ...

    def predict_x0(self, x_t: Tensor, t: Tensor) -> Tensor: ...

    def round(self, x: Tensor) -> Tensor: ...

    def nearest_embedding(self, x: Tensor) -> Tensor: ...

    def sampling_steps(self, steps: int, start: int | None = None) -> list[int]: ...

__all__ = ["EmbeddingModel", "ancestral", "ancestral_clamp", "run_ancestral", "step_coefs", "noise_known"]


def step_coefs(ab_t: Tensor, ab_s: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(coef_x0, coef_xt, std) of the reverse step x_s = coef_x0 x0_hat + coef_xt x_t + std z, s < t.

    temperature 1: the DDPM posterior q(x_s | x_t, x0_hat) (``posterior_coefs``, bit for bit);
    otherwise DDIM with eta = temperature (see the module docstring), which equals it at 1."""
    post = posterior_coefs(ab_t, ab_s)
    if temperature == 1.0:
        return post.coef_x0, post.coef_xt, post.var.sqrt()
    std = temperature * post.var.sqrt()
    c_eps = (1 - ab_s - std**2).clamp(min=0).sqrt()  # weight of eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)
    coef_xt = c_eps / (1 - ab_t).sqrt()
    coef_x0 = ab_s.sqrt() - coef_xt * ab_t.sqrt()
    return coef_x0, coef_xt, std


def noise_known(model: EmbeddingModel, emb: Tensor, t: int, generator: torch.Generator | None) -> Tensor:
    """Clean embeddings (N, L, E) noised to step t as training does: x_start ~ N(emb, beta_0 I), then
    q(x_t | x_start); in one draw, mean sqrt(ab_t) emb and variance 1 - ab_t ab_0."""
    ab = model.schedule.on("alpha_bar", emb.device)  # (T,)
    noise = torch.randn(emb.shape, generator=generator, device=emb.device, dtype=emb.dtype)  # (N, L, E)
    return ab[t].sqrt().to(emb.dtype) * emb + (1 - ab[t] * ab[0]).sqrt().to(emb.dtype) * noise


@torch.no_grad()
def run_ancestral(
    model: EmbeddingModel,
    x: Tensor,
    steps_list: list[int],
    generator: torch.Generator | None,
    *,
    clamp: bool,
    temperature: float = 1.0,
    fixed: Tensor | None = None,
    known: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Run the reverse chain from x (N, L, E) at step ``steps_list[0]`` down the descending ``steps_list``.

    fixed (N, L) bool and known (N, L, E) clean embeddings: the inpainting trick at fixed positions
    (their x_t rows replaced before every call; ignored when nothing is fixed). Returns the last
    x0_hat (N, L, E), known embeddings at fixed positions, and the number of network calls."""
    dtype = x.dtype
    ab = model.schedule.on("alpha_bar", x.device)  # (T,)
    inpaint = fixed is not None and known is not None and bool(fixed.any())
    x0_hat = x
    for i, t in enumerate(steps_list):
        if inpaint:
            x = torch.where(fixed[..., None], noise_known(model, known, t, generator), x)  # type: ignore[index]
        t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (N,)
        x0_hat = model.predict_x0(x, t_vec)  # (N, L, E)
        if clamp:
            x0_hat = model.nearest_embedding(x0_hat)
        if i + 1 == len(steps_list):
            break
        coef_x0, coef_xt, std = step_coefs(ab[t], ab[steps_list[i + 1]], temperature)
        x = coef_x0.to(dtype) * x0_hat + coef_xt.to(dtype) * x  # (N, L, E)
        if temperature != 0.0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)  # (N, L, E)
            x = x + std.to(dtype) * noise
    if inpaint:
        x0_hat = torch.where(fixed[..., None], known, x0_hat)  # type: ignore[index]
    return x0_hat, len(steps_list)


@torch.no_grad()
def _sample(model: EmbeddingModel, options: SampleOptions, generator: torch.Generator | None, *,
            name: str, clamp: bool) -> SampleOutput:
    options.validate()
    reject_unsupported(options, name)  # remasking
    if options.top_p != 1.0:
        raise SamplingError(
            f"sampler {name!r} (diffusion_lm) has no categorical draw to truncate: rounding is an argmax, so top-p "
            "does not apply; leave it at 1 (temperature scales the reverse-step noise instead)"
        )
    if options.stride is not None:
        raise SamplingError(
            f"sampler {name!r} (diffusion_lm) samples every position at once; semi-autoregressive windows "
            "(--block) are mdlm's"
        )
    notes: list[str] = []
    if options.window is not None and options.length > options.window:
        notes.append(
            f"diffusion_lm samples all {options.length} tokens in one piece (no semi-autoregressive windows); "
            f"the model was trained on {options.window}"
        )
    device, dtype = model.device, model.float_dtype()
    n, length = options.num, options.length
    ids, fixed = start_tokens(options, 0, device)  # (N, L) each; ids are the template where fixed
    x = torch.randn(n, length, model.embed_dim, generator=generator, device=device, dtype=dtype)  # (N, L, E)
    known = model.embed(ids).to(dtype) if options.prompted else None  # (N, L, E)
    steps_list = model.sampling_steps(options.steps)
    if options.steps > len(steps_list):
        notes.append(f"{options.steps} steps asked, {len(steps_list)} run: the model has T = {model.T} steps")
    x0, nfe = run_ancestral(model, x, steps_list, generator, clamp=clamp, temperature=options.temperature,
                            fixed=fixed, known=known)
    tokens = torch.where(fixed, ids, model.round(x0))  # (N, L): prompt tokens forced
    return SampleOutput(tokens=tokens, fixed=fixed, nfe=nfe, notes=notes)


def ancestral(model: EmbeddingModel, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """Ancestral sampling with x0-prediction, rounding at the end (see the module docstring)."""
    return _sample(model, options, generator, name="ancestral", clamp=False)


def ancestral_clamp(model: EmbeddingModel, options: SampleOptions,
                    generator: torch.Generator | None = None) -> SampleOutput:
    """:func:`ancestral` with the clamping trick: x0_hat snapped to the nearest word embedding at every step."""
    return _sample(model, options, generator, name="ancestral_clamp", clamp=True)
