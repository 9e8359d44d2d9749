"""Diffusion-LM: Gaussian diffusion over learned word embeddings (Li et al., 2022), x0-parameterised.

The path that worked in the project's journal, as the default:

* Tokens w map to learned embeddings EMB(w) (``model.embed_dim`` wide, N(0, 1) init so the
  signal has the prior's unit scale). ``x_start ~ q(x_start | w) = N(EMB(w), beta_0 I)``
  (the original's ``get_x_start``), then the usual forward process over T integer steps,
  ``x_t = sqrt(alpha_bar_t) x_start + sqrt(1 - alpha_bar_t) eps`` (tables in :mod:`difflm.families.diffusion_lm.gaussian`).
* The network predicts the clean embeddings (x0-prediction) from ``x_t`` and t/T.
* Training loss per real token, averaged over real tokens (never summed over the sequence):
  ``mean_D (x0_hat - target)^2 + mean_D (sqrt(alpha_bar_{T-1}) x_start)^2 + w * CE(x_start @ EMB^T, w)``.
  ``target`` is ``x_start`` for t > 0 and, at t = 0 *only*, the word embedding EMB(w) itself
  (the original's ``t0_mask`` rule; the journal applied such an embedding-alignment term at
  every t and every output collapsed to one generic sentence). The rounding (decoder) logits
  come from the embedding matrix itself (tied weights), so the CE keeps the embeddings apart
  while the MSE would happily shrink them; ``w`` is ``diffusion.likelihood_weight`` (default 1).

``nll_sum`` (``val/nll``) is a variational upper bound on -log p(w) in nats per token, so a
sweep can set it beside mdlm's NELBO. Per token:
``L_t / P(t) + CE(x_start @ EMB^T, w) + KL(q(x_{T-1} | x_start) || N(0, I))`` with one t ~ P per
sequence (uniform, P = 1/T, in training; in validation an importance distribution, see below),
where for t >= 1 ``L_t = KL(q(x_{t-1} | x_t, x_start) || p(x_{t-1} | x_t))`` with p's variance
fixed to the true posterior's (then it is ``(SNR(t-1) - SNR(t)) / 2 * ||x_start - x0_hat||^2``),
and for t = 0 ``L_0 = E[log q(x_start | w) - log p(x_start | x_0)]`` with
``p(x_start | x_0) = N(x0_hat, beta_0 I)``, i.e. ``||x_start - x0_hat||^2 / (2 beta_0) - D/2``
(q's entropy is analytic). Approximations and what is (not) comparable with mdlm:

* Unbiased but noisy: the sum over T steps is a single-t Monte Carlo draw divided by P(t); x_start
  and eps are single draws. The low-t terms carry huge weights (SNR falls steeply there, above all
  for ``sqrt``): with uniform t, a handful of rows at t ~ 0 dominate an eval. So validation (the
  module in eval mode) draws t from ``GaussianSchedule.bound_proposal`` (each step's share of the
  bound for unit-Gaussian data, most mass on the first steps) and weights by 1 / q(t): still
  unbiased, measured std per sequence 20 vs 213 nats with uniform t on a trained tiny model.
  Still noisier than mdlm's. Validation (:meth:`DiffusionLM.val_nll`) takes its K stratified
  steps from the shared val noise's rates and its Gaussian draws from per-sequence seeds, so
  two diffusion_lm models are compared with common random numbers. (The ``train/nelbo``
  metric keeps the uniform-t estimator of the training draws: far noisier.)
* Not what is trained: the loss is the unweighted x0 MSE (+ prior + rounding), not the bound,
  and the reverse variances are fixed (not learned). Both make the bound looser than the best
  this model class could reach; mdlm trains its bound directly. With fixed variances a squared
  x0 error costs linearly, at weights up to ~1e4-1e5 per unit (x T) for the first steps, so an
  undertrained model's bound is huge: measured 1100 -> 192 nats/token over the first 30 steps
  of a tiny CPU run (byte vocab, where log V = 5.6), falling only as low-t predictions become
  precise. Read the gap to mdlm with that in mind; learned variances would tighten it.
* The bound is on the joint of the whole block (every term factorises over positions), divided
  by the number of real tokens: the same unit as mdlm's NELBO (nats per token, discrete data).
  Both are bounds (discrete T here, continuous time there); neither is an exact likelihood, unlike ar.
* Positions that do not count (``valid`` False: BOS, the packer's block-final EOS, padding; see
  :func:`difflm.evaluation.counted_positions`) stay clean context: neither noised nor counted.

Sampling (:meth:`DiffusionLM.sample`): ancestral sampling with x0-prediction from x_{T-1} ~ N(0, I),
optionally strided to ``steps`` steps (exact posterior for any stride), optionally with the
clamping trick (``diffusion.clamp_sampling``: snap x0_hat to the nearest word embedding at every
step), ending with rounding: the argmax of the tied decoder logits. ``difflm sample`` uses
:meth:`DiffusionLM.samplers`: ``ancestral`` and ``ancestral_clamp`` with prompts (inpainting),
temperature (DDIM eta) and a step count (:mod:`difflm.families.diffusion_lm.samplers`). ``difflm denoise``
uses :meth:`DiffusionLM.denoise` (noise at one step, one-shot or sampled reconstruction, cosine
similarity), validation and ``difflm eval`` :meth:`DiffusionLM.val_nll` (K stratified step draws
per sequence). Validation diagnostics live in :mod:`difflm.families.diffusion_lm.diagnostics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.families.base import Family, wide_float
from difflm.families.config import DiffusionConfig
from difflm.families.diffusion_lm.gaussian import GaussianSchedule, get_gaussian_schedule
from difflm.models.config import ModelConfig
from difflm.families.diffusion_lm.denoiser import DiTDenoiser
from difflm.families.diffusion_lm import samplers as ds  # the reverse chain denoise reuses (samplers never import this module)
from difflm.types import DenoiseResult, Diagnostics, LossOutput, ValNoise


class TiedEmbedding(nn.Module):
    """The word-embedding table (V, E), N(0, 1) init, used three ways: lookup, tied rounding logits, and
    the clamping trick's nearest neighbour.

    Every use goes through ``__call__`` (``mode``), never through ``.weight`` from outside, so that
    DeepSpeed ZeRO-3, which gathers a module's partitioned parameters in its forward hooks, sees each use."""

    def __init__(self, vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, embed_dim))  # unit scale, like the prior

    def forward(self, x: Tensor, mode: str = "embed") -> Tensor:
        """embed: ids (...) -> (..., E). logits: vectors (..., E) -> x @ W^T (..., V).
        nearest: vectors (..., E) -> the nearest rows of W in L2 (..., E)."""
        if mode == "embed":
            return F.embedding(x, self.weight)
        weight = self.weight.to(x.dtype)  # (V, E)
        if mode == "logits":
            return x @ weight.T  # (..., V)
        if mode == "nearest":
            score = 2 * x @ weight.T - (weight**2).sum(-1)  # (..., V); argmax = argmin ||x - e_v||^2
            return weight[score.argmax(dim=-1)]  # (..., E)
        raise ValueError(f"unknown mode {mode!r}")


@dataclass
class ContinuousDenoiseResult(DenoiseResult):
    """:class:`DenoiseResult` of a continuous corruption (``corrupted`` is None) with a token view of it.

    corrupted_view:       (B, L) ids, the noisy embeddings x_t rounded to their nearest tokens (the
                          clean ids at positions that were not corrupted): a picture of the noise,
                          not the model's input. ``difflm denoise`` prints it, labelled.
    corrupted_view_label: what the view is, in words."""

    corrupted_view: Tensor | None = None
    corrupted_view_label: str = ""


@dataclass
class Terms:
    """Everything one noising of a batch produces: per-token losses (B, L) and the tensors behind them.

    mse, prior, ce and bound are zero at positions that are not ``valid``."""

    t: Tensor  # (B,) int64 steps
    emb: Tensor  # (B, L, E) clean word embeddings EMB(w)
    x_start: Tensor  # (B, L, E) ~ N(EMB(w), beta_0 I)
    x_t: Tensor  # (B, L, E) noised input (pads: clean EMB)
    x0_hat: Tensor  # (B, L, E) prediction
    target: Tensor  # (B, L, E) x_start, or EMB at t == 0 rows
    mse: Tensor  # (B, L) mean_D (x0_hat - target)^2
    prior: Tensor  # (B, L) mean_D alpha_bar_{T-1} x_start^2
    ce: Tensor  # (B, L) rounding NLL -log p(w | x_start)
    bound: Tensor  # (B, L) per-token variational bound in nats


class DiffusionLM(Family):
    """Continuous embedding diffusion. ``denoiser(x_t (B,L,E), t/T (B,)) -> x0_hat (B,L,E)``."""

    name = "diffusion_lm"

    def __init__(
        self,
        denoiser: nn.Module,
        vocab_size: int,
        embed_dim: int,
        schedule: GaussianSchedule,
        *,
        likelihood_weight: float = 1.0,
        antithetic: bool = True,
        clamp_sampling: bool = False,
    ) -> None:
        super().__init__()
        if getattr(denoiser, "embed_dim", embed_dim) != embed_dim:
            raise ValueError(f"the denoiser works in {denoiser.embed_dim} dims, the embeddings have {embed_dim}")
        self.denoiser = denoiser
        self.embed = TiedEmbedding(vocab_size, embed_dim)
        self.vocab_size, self.embed_dim = vocab_size, embed_dim
        self.schedule = schedule
        self.T = schedule.T
        self.likelihood_weight = likelihood_weight
        self.antithetic = antithetic
        self.clamp_sampling = clamp_sampling

    # ---- shared pieces -------------------------------------------------------------------------

    def float_dtype(self) -> torch.dtype:
        """dtype of noise and losses: the parameters' float dtype, at least float32."""
        return torch.promote_types(self.embed.weight.dtype, torch.float32)

    def table(self, name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
        """Schedule table ``name`` at integer steps t (B,) -> (B, 1, 1) in ``dtype`` (device copy cached)."""
        return self.schedule.on(name, t.device)[t].to(dtype)[:, None, None]

    def sample_t(
        self, n: int, device: torch.device, generator: torch.Generator | None = None, importance: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Steps t (n,) int64 and their bound weights 1 / P(t) (n,) float64.

        Uniform on {0..T-1} (weight T), or with ``importance`` from the schedule's
        ``bound_proposal`` (weight 1 / q(t)): both make ``weight * L_t`` an unbiased estimate of
        the sum over steps. Antithetic: one u, stratified as (u + i/n) mod 1, through the inverse CDF."""
        fdt = torch.float32 if device.type == "mps" else torch.float64
        if self.antithetic:
            u = torch.rand(1, generator=generator, device=device, dtype=fdt)  # (1,)
            u = (u + torch.arange(n, device=device, dtype=fdt) / n) % 1  # (n,)
        else:
            u = torch.rand(n, generator=generator, device=device, dtype=fdt)  # (n,)
        return self.steps_from_uniform(u, importance)

    def steps_from_uniform(self, u: Tensor, importance: bool) -> tuple[Tensor, Tensor]:
        """Uniforms u in [0, 1) (n,) -> steps t (n,) int64 and weights 1 / P(t) (n,), by the inverse CDF of
        the uniform step distribution or (``importance``) of the schedule's ``bound_proposal``."""
        device, n = u.device, u.shape[0]
        if not importance:
            t = (u * self.T).long().clamp(max=self.T - 1)  # (n,)
            return t, torch.full((n,), float(self.T), device=device, dtype=u.dtype)
        cdf = self.schedule.on("bound_proposal_cdf", device)  # (T,)
        t = torch.searchsorted(cdf, u.to(cdf.dtype), right=True).clamp(max=self.T - 1)  # (n,)
        return t, 1.0 / self.schedule.on("bound_proposal", device)[t]

    def predict_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x0_hat (B, L, E), at least float32, from x_t (B, L, E) at integer steps t (B,)."""
        t_frac = t.to(self.float_dtype()) / self.T  # (B,)
        return self.denoiser(x_t, t_frac).to(self.float_dtype())  # (B, L, E)

    def logits(self, x: Tensor) -> Tensor:
        """Rounding (decoder) logits (..., V) = x @ EMB^T: tied to the embeddings."""
        return self.embed(x, mode="logits")  # (..., V)

    def round(self, x: Tensor) -> Tensor:
        """Embeddings (..., E) -> token ids (...): the decoder's argmax."""
        return self.logits(x).argmax(dim=-1)

    def nearest_embedding(self, x: Tensor) -> Tensor:
        """The clamping trick: each vector (..., E) replaced by its nearest word embedding in L2."""
        return self.embed(x, mode="nearest")  # (..., E)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_start + sqrt(1 - alpha_bar_t) noise, (B, L, E)."""
        dtype = x_start.dtype
        return self.table("sqrt_alpha_bar", t, dtype) * x_start + self.table("sqrt_one_minus_alpha_bar", t, dtype) * noise

    # ---- training ------------------------------------------------------------------------------

    def terms(
        self,
        tokens: Tensor,
        valid: Tensor,
        t: Tensor,
        generator: torch.Generator | None = None,
        t_weight: Tensor | None = None,
        noise: tuple[Tensor, Tensor] | None = None,
    ) -> Terms:
        """Noise clean tokens (B, L) at given steps t (B,) and compute every per-token term (no host sync).

        t_weight (B,): 1 / P(t), the Monte Carlo weight of the step term in the bound; None: T (uniform t).
        noise: the two standard-normal draws (B, L, E) of x_start and x_t, given (validation's common
        random numbers); None: drawn here from ``generator``."""
        B, L = tokens.shape
        dtype, device = self.float_dtype(), tokens.device
        emb = self.embed(tokens).to(dtype)  # (B, L, E)
        if noise is None:
            eps0 = torch.randn(emb.shape, generator=generator, device=device, dtype=dtype)  # (B, L, E)
            eps = torch.randn(emb.shape, generator=generator, device=device, dtype=dtype)  # (B, L, E)
        else:
            eps0, eps = (z.to(device=device, dtype=dtype) for z in noise)  # (B, L, E) each
        t0 = torch.zeros_like(t)
        x_start = emb + self.table("sqrt_one_minus_alpha_bar", t0, dtype) * eps0  # (B, L, E)
        x_t = self.q_sample(x_start, t, eps)  # (B, L, E)
        x_t = torch.where(valid[..., None], x_t, emb)  # pads: clean context
        x0_hat = self.predict_x0(x_t, t)  # (B, L, E)

        is_t0 = (t == 0)[:, None, None]  # (B, 1, 1)
        target = torch.where(is_t0, emb, x_start)  # (B, L, E): the t0 rule, t == 0 rows only
        mse = ((x0_hat - target) ** 2).mean(-1)  # (B, L)
        last = torch.full_like(t, self.T - 1)
        ab_last = self.table("alpha_bar", last, dtype)  # (B, 1, 1)
        prior = (ab_last * x_start**2).mean(-1)  # (B, L)
        logits = self.logits(x_start)  # (B, L, V)
        ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(B, L)  # (B, L)

        # Variational bound (see module docstring), nats per token.
        err = ((x_start - x0_hat) ** 2).sum(-1)  # (B, L)
        diffusion = self.table("bound_weight", t, dtype)[:, :, 0] * err  # (B, L)
        diffusion = diffusion - 0.5 * self.embed_dim * is_t0[:, :, 0].to(dtype)  # q(x_start | w)'s entropy, t = 0
        prior_kl = 0.5 * (ab_last * x_start**2 - ab_last - torch.log1p(-ab_last)).sum(-1)  # (B, L)
        scale = float(self.T) if t_weight is None else t_weight.to(dtype)[:, None]  # (B, 1)
        bound = scale * diffusion + ce + prior_kl  # (B, L)

        zero = torch.zeros((), dtype=dtype, device=device)
        return Terms(
            t=t,
            emb=emb,
            x_start=x_start,
            x_t=x_t,
            x0_hat=x0_hat,
            target=target,
            mse=torch.where(valid, mse, zero),
            prior=torch.where(valid, prior, zero),
            ce=torch.where(valid, ce, zero),
            bound=torch.where(valid, bound, zero),
        )

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """Loss on clean tokens (B, L), every id in [0, vocab_size); only ``valid`` positions are noised
        and counted. Draws t (B,), then x_start's and x_t's noise, all from ``generator``. No host sync.

        Training mode draws t uniformly (the x0 loss is the original's, unweighted). Eval mode
        (validation) draws t from the importance distribution for a lower-variance ``nll_sum``;
        its ``loss`` is then the loss at those steps, which the trainer does not use."""
        t, t_weight = self.sample_t(tokens.shape[0], tokens.device, generator, importance=not self.training)
        terms = self.terms(tokens, valid, t, generator, t_weight)
        num_tokens = valid.sum()  # int64 scalar
        denom = num_tokens.clamp(min=1).to(terms.mse.dtype)
        mse, prior, ce = terms.mse.sum() / denom, terms.prior.sum() / denom, terms.ce.sum() / denom
        w = self.likelihood_weight
        loss = mse + prior + (w * ce if w != 0.0 else 0.0)
        return LossOutput(
            loss=loss,
            nll_sum=terms.bound.detach().sum(dtype=wide_float(terms.bound.device)),
            num_tokens=num_tokens,
            metrics={
                "mse": mse.detach(),
                "prior": prior.detach(),
                "rounding_nll": ce.detach(),
                "nelbo": terms.bound.detach().sum() / denom,
            },
        )

    # ---- sampling (the samplers are registered in the FamilySpec: samplers.py) ----------------

    def sampling_steps(self, steps: int, start: int | None = None) -> list[int]:
        """Descending steps from ``start`` (default T-1) to 0 (when steps >= 2), ``min(steps, start + 1)``
        of them, evenly spaced."""
        top = self.T - 1 if start is None else start
        n = max(1, min(steps, top + 1))
        grid = torch.linspace(top, 0, n, dtype=torch.float64).round().long()
        return sorted(set(grid.tolist()), reverse=True)

    # ---- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def val_nll(self, tokens: Tensor, counted: Tensor, noise: ValNoise) -> Tensor:
        """K draws of the variational bound per sequence: (B, K) sums over counted tokens, common random numbers.

        Draw k's step comes from the stratified uniform ``noise.uniform[:, k]`` in (0, 1) (the u behind the
        masking rate), mapped through the inverse CDF of the importance
        distribution (weight 1 / q(t)), so the K steps of a sequence are stratified too. The two
        Gaussian draws of x_start and x_t come from a CPU generator per sequence seeded by
        ``noise.seeds``, drawn in draw order: a sequence gets the same noise in any batch, worker
        or device. The masks of ``noise`` are not used: Gaussian noise touches every counted position."""
        B, L = tokens.shape
        wide = wide_float(tokens.device)
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in noise.seeds.tolist()]
        out = torch.empty(B, noise.samples, dtype=wide, device=tokens.device)  # (B, K)
        for k in range(noise.samples):
            u = noise.uniform[:, k].clamp(0.0, 1.0 - 1e-12)  # (B,)
            t, t_weight = self.steps_from_uniform(u, importance=True)  # (B,), (B,)
            z = torch.stack([torch.randn(2, L, self.embed_dim, generator=g) for g in gens])  # (B, 2, L, E)
            terms = self.terms(tokens, counted, t, None, t_weight, noise=(z[:, 0], z[:, 1]))
            out[:, k] = terms.bound.sum(dim=-1, dtype=wide)  # (B,)
        return out

    def denoise_step_index(self, t: float) -> int:
        """The integer step of noise level t in [0, 1]: round(t * (T - 1))."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"noise level t must be in [0, 1], got {t}")
        return round(t * (self.T - 1))

    @torch.no_grad()
    def denoise(
        self, tokens: Tensor, valid: Tensor, t: float, generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> DenoiseResult:
        """Noise the embeddings of the ``valid`` tokens of (B, L) at step round(t (T-1)) and reconstruct.

        The noising is training's (:meth:`terms`: x_start ~ N(EMB(w), beta_0 I), then q(x_t | x_start);
        other positions stay clean context). steps None (or 0): the one-shot x0_hat = f(x_t, t/T),
        rounded: what the x0 loss scores. steps > 0: that many ancestral steps from t down to 0 (with
        the clamping trick when ``clamp_sampling``), i.e. a *sample* from the reverse chain; the
        other positions are held by the inpainting trick of the prompted samplers.

        ``corrupted`` is None (continuous noise); :class:`ContinuousDenoiseResult.corrupted_view` is
        x_t rounded to the nearest tokens instead. Metrics over valid positions: ``accuracy``,
        ``cosine`` (mean cosine similarity of the final x0 estimate with the true EMB(w)),
        ``norm_ratio`` (mean ||x0_hat|| / mean ||EMB(w)||; well below 1 is magnitude under-prediction)
        and ``xt_accuracy`` (the accuracy of rounding x_t itself: what the model has to beat)."""
        step = self.denoise_step_index(t)
        B, L = tokens.shape
        t_vec = torch.full((B,), step, dtype=torch.long, device=tokens.device)  # (B,)
        terms = self.terms(tokens, valid, t_vec, generator)
        if not steps:
            x0 = terms.x0_hat  # (B, L, E)
            method = f"one-shot: x0_hat = f(x_t) at step round(t*(T-1)) of T={self.T}, rounded (tied decoder argmax)"
        else:
            steps_list = self.sampling_steps(steps, start=step)
            x0, _ = ds.run_ancestral(self, terms.x_t, steps_list, generator, clamp=self.clamp_sampling,
                                     fixed=~valid, known=terms.emb)
            kind = "ancestral_clamp" if self.clamp_sampling else "ancestral"
            method = (f"{kind} sampler from step round(t*(T-1)) of T={self.T} to 0 in up to {steps} steps, "
                      "rounded (a sample, not the one-shot estimate)")
        recon = torch.where(valid, self.round(x0), tokens)  # (B, L)
        n_valid = int(valid.sum())
        nan = float("nan")

        def mean_valid(v: Tensor) -> float:
            return float(v[valid].double().mean()) if n_valid else nan

        cos = F.cosine_similarity(x0, terms.emb, dim=-1)  # (B, L)
        emb_norm = mean_valid(terms.emb.norm(dim=-1))
        norm_ratio = mean_valid(x0.norm(dim=-1)) / max(emb_norm, 1e-12) if n_valid else nan
        noisy = torch.where(valid, self.round(terms.x_t), tokens)  # (B, L)
        metrics = {
            "accuracy": mean_valid((recon == tokens).float()),
            "cosine": mean_valid(cos),
            "norm_ratio": norm_ratio,
            "xt_accuracy": mean_valid((noisy == tokens).float()),
        }
        return ContinuousDenoiseResult(
            corrupted=None, noised=None, reconstructed=recon, metrics=metrics, method=method,
            corrupted_view=noisy, corrupted_view_label="the noisy embeddings x_t rounded to their nearest tokens: a picture of the "
            "Gaussian noise, not the model's input",
        )

    @torch.no_grad()
    def diagnostics(
        self, tokens: Tensor, generator: torch.Generator | None, decode: Callable[[list[int]], str]
    ) -> Diagnostics:
        """Per-noise-bucket x0 quality, a denoising demo and an input-dependence check (see diffusion_lm_eval)."""
        from difflm.families.diffusion_lm.diagnostics import diffusion_lm_diagnostics

        return diffusion_lm_diagnostics(self, tokens, generator, decode)


def build_diffusion_lm(
    model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int, **special_ids: Any
) -> DiffusionLM:
    """Registry builder: DiT (default) or BART denoiser, a Gaussian schedule over ``diffusion.timesteps``.

    Time conditioning is always on (model.time_conditioning is ignored): the noise level of a
    Gaussian-corrupted input is not something the network should have to guess. special_ids unused."""
    d = model_cfg.dims()
    denoiser: nn.Module
    if model_cfg.backbone == "bart":
        from difflm.families.diffusion_lm.bart import BartDenoiser

        denoiser = BartDenoiser(
            model_cfg.embed_dim,
            d["d_model"],
            d["n_layers"],
            d["n_heads"],
            d["cond_dim"],
            dropout=model_cfg.dropout,
            pretrained_path=model_cfg.pretrained_path,
        )
    else:
        denoiser = DiTDenoiser(
            model_cfg.embed_dim, d["d_model"], d["n_layers"], d["n_heads"], d["cond_dim"], dropout=model_cfg.dropout
        )
    return DiffusionLM(
        denoiser,
        vocab_size,
        model_cfg.embed_dim,
        get_gaussian_schedule(diffusion_cfg.schedule, diffusion_cfg.timesteps),
        likelihood_weight=diffusion_cfg.likelihood_weight,
        antithetic=diffusion_cfg.antithetic,
        clamp_sampling=diffusion_cfg.clamp_sampling,
    )
