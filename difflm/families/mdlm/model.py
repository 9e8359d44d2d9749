"""MDLM: absorbing-state masked diffusion with the SUBS parameterization (Sahoo et al., 2024).

Forward process: each token is independently replaced by the mask token (id
``vocab_size``) with probability ``move_chance(t)``. The model predicts the clean
token x0 at every position; SUBS substitutes two facts into that prediction:

* zero masking probability: the mask logit is -inf, the model never predicts a mask;
* carry-over unmasking: an unmasked position's distribution is a copy of its input,
  so it contributes exactly 0 to the loss and gets no gradient.

The continuous-time NELBO is then, per masked token, ``dsigma/expm1(sigma) * -log p(x0|xt)``
(1/t for loglinear), normalised by the number of counted tokens (never BOS or the packer's
block-final EOS: :func:`difflm.evaluation.counted_positions`). That is the training loss, with
the schedule's own time sampling. Validation (:meth:`MDLM.val_nll`) integrates the same NELBO
over the masking rate on one range for every schedule, with the shared val noise.

ATAT (``diffusion.atat``, ``atat.py``) changes only the *training* forward (``self.training``):
an importance head (reading a uniformly masked probe, or the clean sequence), importance-biased
masking at the schedule's rate, a curriculum, and importance-weighted or importance-sampling
(unbiased) loss weights. In eval mode, and in ``val_nll``/``denoise``/sampling, masking is
always plain and unbiased, so the val NELBO of an ATAT run compares with plain mdlm's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from difflm.families.base import Family, masked_denoise_metrics, wide_float
from difflm.families.config import AtatConfig, DiffusionConfig
from difflm.families.mdlm import atat as at
from difflm.families.mdlm import samplers as ms  # the reverse-process loops denoise reuses (samplers never import this module)
from difflm.losses import token_cross_entropy
from difflm.models.backbone import Backbone
from difflm.models.config import ModelConfig
from difflm.schedules import NoiseSchedule, get_schedule, sample_times
from difflm.types import DenoiseResult, LossOutput, SampleOptions, ValNoise


class MDLM(Family):
    """Masked diffusion LM. The backbone must read and write ``vocab_size + 1`` ids (the extra one is the mask)."""

    name = "mdlm"

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        schedule: NoiseSchedule,
        *,
        sampling_eps: float = 1e-3,
        antithetic: bool = True,
        likelihood_weight: float = 1.0,
        time_conditioning: bool = False,
        atat: AtatConfig | None = None,
    ) -> None:
        super().__init__()
        if backbone.vocab_in != vocab_size + 1 or backbone.vocab_out != vocab_size + 1:
            raise ValueError("the mdlm backbone needs vocab_in == vocab_out == vocab_size + 1 (mask token)")
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.schedule = schedule
        self.sampling_eps = sampling_eps
        self.antithetic = antithetic
        self.likelihood_weight = likelihood_weight
        self.time_conditioning = time_conditioning
        atat = atat or AtatConfig()
        # The head exists iff the build config asks for it (a staged spec builds it when any stage uses
        # it); whether it is trained and used is the runtime switch self.atat (see configure).
        self.importance: at.ImportanceHead | None = (
            at.ImportanceHead(backbone.d_model, atat.head_width, atat.head_layers, atat.head_heads)
            if atat.importance_head else None
        )
        self.atat = atat
        self.progress = 0.0

    # ---- pieces shared by the loss and the samplers -------------------------------------------

    def float_dtype(self) -> torch.dtype:
        """dtype of times and noise: the parameters' float dtype, at least float32 (bf16 times are too coarse)."""
        return torch.promote_types(self.backbone.embed.weight.dtype, torch.float32)

    def sample_times(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U[sampling_eps, 1], (n,). Antithetic: t_i = (u + i/n) mod 1 from a single u, so the batch
        covers [0, 1) evenly and the loss variance across steps drops."""
        return sample_times(n, sampling_eps=self.sampling_eps, antithetic=self.antithetic, device=device,
                            dtype=self.float_dtype(), generator=generator)

    def subs_logits(self, xt: Tensor, sigma: Tensor) -> Tensor:
        """Backbone logits (B, L, V+1), at least float32, with the mask logit at -inf (zero masking prob).

        sigma (B,) reaches the backbone only with time conditioning on."""
        logits = self.backbone(xt, sigma if self.time_conditioning else None)  # (B, L, V+1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.pad(logits[..., : self.mask_id], (0, 1), value=float("-inf"))  # (B, L, V+1)

    def denoiser_logits(self, xt: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
        """Backbone logits (B, L, V+1) of the noised ids xt (B, L) that the loss and val/nll score. MDLM sees xt
        (and sigma (B,) with time conditioning); bd3lm overrides this with its block-causal pass over [xt, x0]."""
        return self.backbone(xt, sigma if self.time_conditioning else None)

    def subs_ce(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """Per-token -log p(x0 | x_t) under SUBS, (B, L) float32, from backbone logits (B, L, V+1).

        Zero masking probability: the mask logit is left out of the softmax (as if -inf, like
        :meth:`subs_logits`). The logits stay in their own dtype (bf16 under autocast); the CE runs
        in float32 row chunks (:func:`difflm.losses.token_cross_entropy`), with no float32 copy of
        the (B, L, V+1) logits. Training, validation and the bijective family all score this way."""
        B, L = tokens.shape
        return token_cross_entropy(logits.flatten(0, 1), tokens.flatten(), classes=self.mask_id).view(B, L)

    def log_probs(self, xt: Tensor, sigma: Tensor) -> Tensor:
        """SUBS log p(x0 | xt), (B, L, V+1): the model's prediction at masked positions, a copy elsewhere."""
        logp = self.subs_logits(xt, sigma).log_softmax(dim=-1)  # (B, L, V+1)
        copy = torch.full_like(logp, float("-inf")).scatter_(-1, xt[..., None], 0.0)  # (B, L, V+1)
        return torch.where((xt != self.mask_id)[..., None], copy, logp)  # (B, L, V+1)

    # ---- training stages (runtime switches) --------------------------------------------------------

    def configure(self, diffusion: DiffusionConfig) -> None:
        """Apply a training stage's switches: ``atat`` and ``likelihood_weight`` (FamilySpec.switches)."""
        atat = getattr(diffusion, "atat", None)  # bijective (an MDLM without ATAT) has none
        if atat is not None and atat.importance_head and self.importance is None:
            raise ValueError(
                "this stage turns on diffusion.atat.importance_head but the model was built without the head; "
                "build it from RunSpec.build_diffusion() (any stage's head switch builds it)"
            )
        if atat is not None:
            self.atat = atat
        if diffusion.likelihood_weight is not None:  # null: the family default, resolved by the caller (the runner)
            self.likelihood_weight = diffusion.likelihood_weight

    def set_progress(self, fraction: float) -> None:
        """Share of the current stage's steps done, in [0, 1]: drives the ATAT curriculum phase."""
        self.progress = float(fraction)

    # ---- training ------------------------------------------------------------------------------

    def nelbo_terms(
        self, tokens: Tensor, valid: Tensor, t: Tensor, generator: torch.Generator | None = None,
        mask_probs: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Noise clean tokens (B, L) at times t (B,) and score them: per-token NELBO (B, L), masked-token
        cross-entropy (B, L) and the mask (B, L) bool. Draws the mask noise (B, L) from ``generator``.

        ``mask_probs`` (B, L): per-token masking probabilities replacing move_chance(t) (ATAT's adaptive
        masking; the same noise draw, so a uniform ``mask_probs`` gives exactly the plain mask)."""
        B, L = tokens.shape
        sigma = self.schedule.sigma(t)  # (B,)
        move = self.schedule.move_chance(t)  # (B,)
        noise = torch.rand(B, L, generator=generator, device=tokens.device, dtype=t.dtype)  # (B, L)
        probs = move[:, None] if mask_probs is None else mask_probs  # (B, 1) or (B, L)
        masked = (noise < probs) & valid  # (B, L)
        xt = torch.where(masked, self.mask_id, tokens)  # (B, L)

        ce = self.subs_ce(self.denoiser_logits(xt, tokens, sigma), tokens).masked_fill(~masked, 0.0)  # (B, L); SUBS: unmasked cost 0
        # Weight zeroed off the masked set first: at t == 0 it is inf and inf * 0 would be nan (also in backward).
        weight = torch.where(masked, self.schedule.nelbo_weight(t)[:, None], 0.0)  # (B, L)
        return weight * ce, ce, masked

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """Loss on clean tokens (B, L) (every id in [0, vocab_size), pads included); only ``valid`` positions
        are noised and counted (the trainer passes counted_positions); the others stay visible as clean
        context. No host sync."""
        t = self.sample_times(tokens.shape[0], tokens.device, generator)  # (B,)
        if self.training and self.importance is not None and self.atat.active:
            return self._atat_forward(tokens, valid, t, generator)
        nelbo_tok, ce, masked = self.nelbo_terms(tokens, valid, t, generator)  # (B, L) each
        return self.loss_output(nelbo_tok, ce, masked, valid)

    def loss_output(self, nelbo_tok: Tensor, ce: Tensor, masked: Tensor, valid: Tensor) -> LossOutput:
        """The training loss and metrics from per-token NELBO, masked CE and mask (B, L), averaged over the
        ``valid`` tokens; ``likelihood_weight`` mixes NELBO and masked CE (bd3lm keeps 1: the NELBO)."""
        num_tokens = valid.sum()  # int64 scalar
        denom = num_tokens.clamp(min=1).to(ce.dtype)
        nelbo = nelbo_tok.sum() / denom
        masked_ce = ce.sum() / denom
        w = self.likelihood_weight
        loss = nelbo if w == 1.0 else masked_ce if w == 0.0 else w * nelbo + (1 - w) * masked_ce
        return LossOutput(
            loss=loss,
            nll_sum=nelbo_tok.detach().sum(dtype=wide_float(nelbo_tok.device)),
            num_tokens=num_tokens,
            metrics={
                "nelbo": nelbo.detach(),
                "masked_ce": masked_ce.detach(),
                "mask_rate": masked.sum().to(ce.dtype) / denom,
            },
        )

    def atat_masking(
        self, tokens: Tensor, valid: Tensor, t: Tensor, generator: torch.Generator | None
    ) -> at.AtatMasks:
        """ATAT's importance and masking probabilities for clean tokens (B, L) at times t (B,) (atat.py).

        ``importance_from: clean``: the head reads the backbone's hidden states of x0, so the masks depend
        on the answer. ``noisy``: a probe x_t' is masked uniformly at rate m' = m ** probe_power >= m
        (one no-grad backbone pass gives its hidden states and its own CE at the probe's masks, the head's
        target); the final mask is drawn only inside the probe's masked set, keeping a share m / m' of it,
        biased by the head's importance. Every token the head saw therefore stays visible in x_t, and the
        mask's law depends on x0 only through x_t's visible tokens: it tells the denoiser nothing about the
        tokens it must predict (tests/test_atat.py checks this). Draws the probe's noise from ``generator``."""
        assert self.importance is not None
        cfg = self.atat
        B, L = tokens.shape
        move = self.schedule.move_chance(t)  # (B,)
        if cfg.importance_from == "clean":
            with torch.no_grad():  # the head reads features; it never trains the backbone
                sigma0 = torch.zeros(B, device=tokens.device, dtype=t.dtype) if self.time_conditioning else None
                _, hidden = self.backbone(tokens, sigma0, return_hidden=True)  # (B, L, D)
            candidates, rate, target = valid, move, None
        else:
            rate_probe = move.clamp(min=1e-12).pow(cfg.probe_power).clamp(max=1 - 1e-6)  # (B,) >= move
            noise = torch.rand(B, L, generator=generator, device=tokens.device, dtype=t.dtype)  # (B, L)
            candidates = (noise < rate_probe[:, None]) & valid  # (B, L) the probe's masks
            xp = torch.where(candidates, self.mask_id, tokens)  # (B, L)
            with torch.no_grad():
                sigma_p = (-torch.log1p(-rate_probe)).to(t.dtype)  # (B,) absorbing: move = 1 - e^-sigma
                logits_p, hidden = self.backbone(xp, sigma_p if self.time_conditioning else None, return_hidden=True)
                target = at.importance_target(self.subs_ce(logits_p, tokens))  # (B, L) 1 - p(x0 | x_t')
            rate = move / rate_probe  # (B,) share of the probe's masks the final mask keeps
        head_logits = self.importance(hidden)  # (B, L) with grad into the head only
        importance = torch.sigmoid(head_logits.detach().float())  # (B, L)
        focus = at.current_focus(cfg, self.progress)
        probs = None
        if cfg.adaptive_masking:
            bias = at.focus_bias(at.rank_quantiles(importance, candidates), focus, cfg.strength)  # (B, L)
            probs = at.adaptive_mask_probs(rate, bias, candidates, cfg.strength)  # (B, L); 0 off the candidates
        elif cfg.importance_from == "noisy":
            probs = torch.where(candidates, rate[:, None], 0.0).to(t.dtype)  # uniform thinning: plain masks
        return at.AtatMasks(head_logits, importance, probs, rate, target, candidates if target is not None else None, focus)

    def _atat_forward(
        self, tokens: Tensor, valid: Tensor, t: Tensor, generator: torch.Generator | None
    ) -> LossOutput:
        """Training forward with ATAT (see atat.py): importance (:meth:`atat_masking`), biased masks at the
        schedule's rate, optional importance-sampling and importance weights, plus the head's own loss."""
        cfg = self.atat
        am = self.atat_masking(tokens, valid, t, generator)
        nelbo_tok, ce, masked = self.nelbo_terms(tokens, valid, t, generator, mask_probs=am.probs)  # (B, L) each

        weights = at.importance_weights(am.importance, masked, cfg.weighted_loss) if cfg.weighted_loss > 0 else None
        if cfg.unbiased and am.probs is not None:
            iw = at.unbiased_weights(am.rate, am.probs, masked, cfg.max_weight)  # (B, L)
            weights = iw if weights is None else weights * iw
        num_tokens = valid.sum()
        denom = num_tokens.clamp(min=1).to(ce.dtype)
        nelbo = (nelbo_tok if weights is None else nelbo_tok * weights).sum() / denom
        masked_ce = (ce if weights is None else ce * weights).sum() / denom
        w = self.likelihood_weight
        main = nelbo if w == 1.0 else masked_ce if w == 0.0 else w * nelbo + (1 - w) * masked_ce
        if am.target is None:  # clean: the target is the final mask's own CE
            target, where = at.importance_target(ce), masked  # (B, L) detached
        else:  # noisy: the probe's CE at the probe's (uniform) masks, what the head's input can predict
            target, where = am.target, am.where
            assert where is not None
        h_loss = at.head_loss(am.head_logits, target, where)
        metrics = {
            "nelbo": nelbo.detach(),
            "masked_ce": masked_ce.detach(),
            "mask_rate": masked.sum().to(ce.dtype) / denom,
            "importance_loss": h_loss.detach(),
            "importance_mean": (am.importance * valid).sum() / denom,
            "importance_corr": at.pearson(am.importance, target, where),
        }
        if cfg.curriculum:
            metrics["curriculum_phase"] = torch.tensor(float(at.PHASES.index(am.focus)), device=tokens.device)
        scored = nelbo_tok if not (cfg.unbiased and am.probs is not None) else nelbo_tok * weights
        return LossOutput(
            # The head's loss enters scaled by HEAD_GRAD_SCALE: its gradients must not dominate the global
            # grad-norm clip that the backbone's share (atat.HEAD_GRAD_SCALE says why; Adam undoes the scale).
            loss=main + (cfg.head_loss_weight * at.HEAD_GRAD_SCALE) * h_loss,
            # biased masks: not a val number (with unbiased weights an unbiased estimate, still not val's noise)
            nll_sum=scored.detach().sum(dtype=wide_float(tokens.device)),
            num_tokens=num_tokens,
            metrics=metrics,
            histograms={"importance": am.importance[valid]},
        )

    # ---- validation --------------------------------------------------------------------------

    @torch.no_grad()
    def val_nll(self, tokens: Tensor, counted: Tensor, noise: ValNoise) -> Tensor:
        """K NELBO draws per sequence in masking-rate space: (B, K) sums over counted tokens.

        With masking rate m (move chance), the continuous-time NELBO is, whatever the schedule,
        ``integral over m of (1/m) E[sum over masked tokens of -log p(x0 | x_m)] dm`` (substitute
        m = move_chance(t) in the time integral: dsigma/expm1(sigma) dt = dm/m). Draw k uses
        m = ``noise.rates[:, k]`` (importance-sampled over (0, 1], weight ``noise.weights[:, k]`` = 1/p(m))
        and the mask ``noise.masked(k, counted)``, so its estimate is ``weight / m * sum_masked CE``. A
        time-conditioned model sees sigma = -log(1 - m): the sigma its schedule gives at the t
        where move_chance(t) = m, so no schedule is needed here. One forward of (B, L) per draw."""
        B, L = tokens.shape
        wide = wide_float(tokens.device)
        out = torch.empty(B, noise.samples, dtype=wide, device=tokens.device)  # (B, K)
        for k in range(noise.samples):
            m = noise.rates[:, k]  # (B,)
            masked = noise.masked(k, counted)  # (B, L)
            xm = torch.where(masked, self.mask_id, tokens)  # (B, L)
            sigma = (-torch.log1p(-m)).to(self.float_dtype())  # (B,)
            ce = self.subs_ce(self.denoiser_logits(xm, tokens, sigma), tokens).masked_fill(~masked, 0.0)  # (B, L)
            out[:, k] = ce.sum(dim=-1, dtype=wide) * (noise.weights[:, k].to(wide) / m.to(wide))  # (B,)
        return out

    # ---- denoising (sampling itself is registered in the FamilySpec: samplers.py) -------------

    @torch.no_grad()
    def denoise_step(self, x: Tensor, t: Tensor, s: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One ancestral step x_t (B, L) -> x_s (B, L), s < t, times (B,).

        A masked token stays masked with probability move_chance(s)/move_chance(t), otherwise it
        is unmasked to a draw from p(x0 | x_t); unmasked tokens are copied."""
        move_t = self.schedule.move_chance(t)[:, None]  # (B, 1)
        move_s = self.schedule.move_chance(s)[:, None]  # (B, 1)
        logp = self.log_probs(x, self.schedule.sigma(t))  # (B, L, V+1)
        return ms.ddpm_step(x, logp, move_t, move_s, self.mask_id, 1.0, generator)[0]

    @torch.no_grad()
    def denoise(
        self, tokens: Tensor, valid: Tensor, t: float, generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> DenoiseResult:
        """Mask each ``valid`` token of (B, L) with probability move_chance(t) and reconstruct.

        steps None (or 0): one forward pass, the argmax of p(x0 | x_t) at every mask: the model's
        best single guess, what the training loss scores. steps > 0: the ddpm sampler from t down to
        eps (cached when valid), i.e. a *sample* consistent with the unmasked tokens."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"noise level t must be in [0, 1], got {t}")
        B, L = tokens.shape
        dtype = self.float_dtype()
        tt = torch.full((B,), float(t), device=tokens.device, dtype=dtype)  # (B,)
        noise = torch.rand(B, L, generator=generator, device=tokens.device, dtype=dtype)  # (B, L)
        noised = (noise < self.schedule.move_chance(tt)[:, None]) & valid  # (B, L)
        xt = torch.where(noised, self.mask_id, tokens)  # (B, L)
        if not steps:
            recon = self.log_probs(xt, self.schedule.sigma(tt)).argmax(dim=-1)  # (B, L); copies unmasked ids
            method = "one-shot: argmax of p(x0 | x_t) at every mask (one forward pass)"
        else:
            opts = SampleOptions(num=B, length=L, steps=steps)
            recon, _ = ms.run_ddpm(self, xt, opts, generator, cache=not self.time_conditioning, t_start=float(t))
            method = f"ddpm sampler from t={t:g} to 1e-5 in {steps} steps (a sample, not the argmax)"
        metrics = masked_denoise_metrics(recon, tokens, valid, noised)
        return DenoiseResult(corrupted=xt, noised=noised, reconstructed=recon, metrics=metrics, method=method)


def build_mdlm(
    model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int, **special_ids: Any
) -> MDLM:
    """Registry builder. special_ids (bos_id, ...) are not needed by mdlm and ignored."""
    backbone = Backbone.from_config(model_cfg, vocab_in=vocab_size + 1, vocab_out=vocab_size + 1)
    return MDLM(
        backbone,
        vocab_size,
        get_schedule(diffusion_cfg.schedule, diffusion_cfg.eps),
        sampling_eps=diffusion_cfg.sampling_eps,
        antithetic=diffusion_cfg.antithetic,
        likelihood_weight=diffusion_cfg.likelihood_weight,
        time_conditioning=model_cfg.time_conditioning,
        atat=diffusion_cfg.atat,
    )
