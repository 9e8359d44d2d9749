"""SEDD: score-entropy discrete diffusion (Lou, Meng & Ermon, 2024) on the project's backbone.

The network reads x_t (B, L) and writes, per position, one value per token; the graph turns that
into the log concrete score ``log p_t(y) / p_t(x_t)`` (:mod:`difflm.families.sedd.graphs`). The
loss is the diffusion-weighted denoising score entropy

    loss = (1 / n_real) * sum_{real positions} sigma'(t) * DSE(s(x_t), x_t, x0)

with t ~ U[sampling_eps, 1] (antithetic like mdlm), normalised by the real (counted) tokens, never
summed over the sequence. For absorb only masked positions contribute; for uniform every real
position does. Its expectation over t is an upper bound on the NLL of the counted tokens (the
prior term at t = 1 aside, as for mdlm).

``val/nll`` (:meth:`SEDD.val_nll`) integrates the same bound over the shared masking rate m of
:mod:`difflm.evaluation`: sigma = -log(1 - m), d sigma = dm / (1 - m), so draw k estimates
``weight_k * sum DSE(sigma(m_k)) / (1 - m_k)`` (weight_k = noise.weights, the importance weight over (0, 1]); for absorb (r = (1 - m)/m) that is
``weight_k * (1/m) * sum_masked (expm1(lse a) - a_x0)``, equal to mdlm's NELBO integrand when the
scores are normalised. A sweep therefore ranks sedd, mdlm and ar on one scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflm.families.base import Family, masked_denoise_metrics, wide_float
from difflm.families.config import DiffusionConfig
from difflm.families.sedd import samplers as ss  # the reverse-process loop denoise reuses (samplers never import this module)
from difflm.families.sedd.graphs import Graph, get_graph
from difflm.models.backbone import Backbone
from difflm.models.config import ModelConfig
from difflm.schedules import Geometric, LogLinear, NoiseSchedule, sample_times
from difflm.types import DenoiseResult, LossOutput, SampleOptions, ValNoise

#: sedd's noise schedules (``diffusion.schedule``), default first; geometric reads sigma_min / sigma_max.
SEDD_NOISES = {
    "loglinear": lambda cfg: LogLinear(cfg.eps),
    "geometric": lambda cfg: Geometric(cfg.eps, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max),
}


class SEDD(Family):
    """Score-entropy discrete diffusion with an ``absorb`` or ``uniform`` graph."""

    name = "sedd"

    def __init__(
        self,
        backbone: Backbone,
        graph: Graph,
        schedule: NoiseSchedule,
        *,
        sampling_eps: float = 1e-3,
        antithetic: bool = True,
        time_conditioning: bool = False,
    ) -> None:
        super().__init__()
        if backbone.vocab_in != graph.input_vocab or backbone.vocab_out != graph.vocab_size:
            raise ValueError(
                f"the sedd backbone needs vocab_in == {graph.input_vocab} and vocab_out == {graph.vocab_size} "
                f"for the {graph.name} graph"
            )
        if not graph.absorb and not time_conditioning:
            raise ValueError("sedd's uniform graph needs time conditioning: set model.time_conditioning: true")
        self.backbone = backbone
        self.graph = graph
        self.vocab_size = graph.vocab_size
        self.schedule = schedule
        self.sampling_eps = sampling_eps
        self.antithetic = antithetic
        self.time_conditioning = time_conditioning

    @property
    def mask_id(self) -> int | None:
        """The MASK id (absorb) or None (uniform)."""
        return self.vocab_size if self.graph.absorb else None

    def float_dtype(self) -> torch.dtype:
        """dtype of times and noise: the parameters' float dtype, at least float32."""
        return torch.promote_types(self.backbone.embed.weight.dtype, torch.float32)

    # ---- the network ---------------------------------------------------------------------------

    def log_score(self, xt: Tensor, sigma: Tensor) -> Tensor:
        """Log concrete score (B, L, dim), at least float32, of x_t (B, L) at total noise sigma (B,)."""
        out = self.backbone(xt, sigma if self.time_conditioning else None)  # (B, L, V)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        return self.graph.log_score(out, xt, sigma.to(out.dtype))

    # ---- training ------------------------------------------------------------------------------

    def _random_ids(self, shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> Tensor | None:
        if not self.graph.needs_random_ids:
            return None
        return torch.randint(0, self.vocab_size, shape, generator=generator, device=device)  # (B, L)

    def dse_terms(
        self, tokens: Tensor, valid: Tensor, t: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Corrupt clean tokens (B, L) at times t (B,) and score them: sigma'(t) * DSE per position (B, L)
        (0 off the scored set) and the corrupted positions (B, L). Draws the jump uniforms (B, L), then
        (uniform graph) the new tokens (B, L) from ``generator``."""
        B, L = tokens.shape
        sigma = self.schedule.sigma(t)  # (B,)
        move = self.schedule.move_chance(t)  # (B,)
        u = torch.rand(B, L, generator=generator, device=tokens.device, dtype=t.dtype)  # (B, L)
        noised = (u < move[:, None]) & valid  # (B, L)
        xt = self.graph.corrupt(tokens, noised, self._random_ids(tokens.shape, tokens.device, generator))
        dse = self.graph.score_entropy(self.log_score(xt, sigma), xt, tokens, sigma)  # (B, L)
        # Scored set: the real positions (uniform), of which only the masked ones are nonzero (absorb).
        dse = torch.where(valid, dse, 0.0)
        return self.schedule.dsigma(t)[:, None].to(dse.dtype) * dse, noised

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """Diffusion-weighted DSE per real token; only ``valid`` positions are corrupted and counted."""
        t = sample_times(tokens.shape[0], sampling_eps=self.sampling_eps, antithetic=self.antithetic,
                         device=tokens.device, dtype=self.float_dtype(), generator=generator)  # (B,)
        per_pos, noised = self.dse_terms(tokens, valid, t, generator)  # (B, L) each
        num_tokens = valid.sum()
        denom = num_tokens.clamp(min=1).to(per_pos.dtype)
        loss = per_pos.sum() / denom
        return LossOutput(
            loss=loss,
            nll_sum=per_pos.detach().sum(dtype=wide_float(tokens.device)),
            num_tokens=num_tokens,
            metrics={"score_entropy": loss.detach(), "noised_rate": noised.sum().to(per_pos.dtype) / denom},
        )

    @torch.no_grad()
    def nll_samples(
        self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None, samples: int
    ) -> tuple[Tensor, Tensor]:
        """K = ``samples`` draws of the bound per sequence (B, K) float64 and token counts (B,): the batch
        tiled K times with antithetic times, so every sequence gets K times stratified over [0, 1)."""
        B = tokens.shape[0]
        t = sample_times(samples * B, sampling_eps=self.sampling_eps, antithetic=self.antithetic,
                         device=tokens.device, dtype=self.float_dtype(), generator=generator)  # (K*B,)
        per_pos, _ = self.dse_terms(tokens.repeat(samples, 1), valid.repeat(samples, 1), t, generator)
        wide = wide_float(tokens.device)
        per = per_pos.sum(dim=-1, dtype=wide).view(samples, B).T  # (B, K)
        return per.contiguous(), valid.sum(dim=-1).to(wide)

    @torch.no_grad()
    def val_nll(self, tokens: Tensor, counted: Tensor, noise: ValNoise) -> Tensor:
        """Per-sequence bound sums over counted positions (B, K) float64; column k from draw k of ``noise``.

        Draw k: masking rate m (B,), corrupted positions ``noise.masked(k, counted)``, sigma = -log(1 - m);
        estimate ``weight_k * sum_counted DSE / (1 - m)`` (the DSE integral over m, d sigma = dm / (1 - m)).
        The uniform graph's new tokens come from a generator seeded by ``noise.seeds`` (CPU, then moved),
        so they are common random numbers too."""
        B, L = tokens.shape
        K = noise.samples
        wide = wide_float(tokens.device)
        dtype = self.float_dtype()
        random_ids = None
        if self.graph.needs_random_ids:
            random_ids = torch.empty(B, K, L, dtype=torch.long)  # (B, K, L)
            gen = torch.Generator(device="cpu")
            for b, seed in enumerate(noise.seeds.tolist()):
                gen.manual_seed(int(seed))
                random_ids[b] = torch.randint(0, self.vocab_size, (K, L), generator=gen)
            random_ids = random_ids.to(tokens.device)
        out = torch.empty(B, K, dtype=wide, device=tokens.device)
        for k in range(K):
            m = noise.rates[:, k]  # (B,) float64
            noised = noise.masked(k, counted)  # (B, L)
            sigma = (-torch.log1p(-m)).to(dtype)  # (B,)
            xt = self.graph.corrupt(tokens, noised, None if random_ids is None else random_ids[:, k])
            dse = self.graph.score_entropy(self.log_score(xt, sigma), xt, tokens, sigma)  # (B, L)
            per_seq = torch.where(counted, dse, 0.0).sum(dim=-1, dtype=wide)  # (B,)
            out[:, k] = noise.weights[:, k].to(wide) * per_seq / (1 - m.to(wide))
        return out

    # ---- denoising (sampling itself is registered in the FamilySpec: samplers.py) -------------

    @torch.no_grad()
    def denoise(
        self, tokens: Tensor, valid: Tensor, t: float, generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> DenoiseResult:
        """Corrupt each ``valid`` token of (B, L) with probability 1 - e^-sigma(t) (absorb: to MASK; uniform:
        to a uniformly random token) and reconstruct.

        steps None (or 0): the Tweedie denoiser at sigma(t) (one forward pass), its most likely id at every
        position that may have changed; steps > 0: the analytic sampler from t down to 1e-5."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"noise level t must be in [0, 1], got {t}")
        B, L = tokens.shape
        dtype = self.float_dtype()
        tt = torch.full((B,), float(t), device=tokens.device, dtype=dtype)  # (B,)
        u = torch.rand(B, L, generator=generator, device=tokens.device, dtype=dtype)  # (B, L)
        noised = (u < self.schedule.move_chance(tt)[:, None]) & valid  # (B, L)
        xt = self.graph.corrupt(tokens, noised, self._random_ids(tokens.shape, tokens.device, generator))
        # Positions the model may change: masks (absorb) or every real position (uniform: it cannot see
        # which ones were resampled).
        hold = ~noised if self.graph.absorb else ~valid  # (B, L)
        if not steps:
            recon = ss.denoise_argmax(self, xt, hold, max(float(t), ss.MIN_T))
            method = "one-shot: the most likely id of the Tweedie denoiser at sigma(t) (one forward pass)"
        else:
            opts = SampleOptions(num=B, length=L, steps=steps)
            recon, _ = ss.run(self, xt, hold, opts, generator, kind="analytic", t_start=float(t))
            method = f"analytic sampler from t={t:g} to 1e-5 in {steps} steps (a sample, not the argmax)"
        if not self.graph.absorb:
            method += "; uniform graph: the model saw a random token at each corrupted position"
        metrics = masked_denoise_metrics(recon, tokens, valid, noised)
        return DenoiseResult(corrupted=xt, noised=noised, reconstructed=recon, metrics=metrics, method=method)


# ---- registry hooks ------------------------------------------------------------------------------


def check_sedd(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> None:
    """Combinations sedd cannot train (ValueError naming the field)."""
    if diffusion_cfg.graph == "uniform" and not model_cfg.time_conditioning:
        raise ValueError(
            "sedd with diffusion.graph: uniform needs model.time_conditioning: true (the score's scale depends "
            "on sigma, and with uniform noise no mask count reveals it)"
        )


def build_sedd(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int, **special_ids: Any) -> SEDD:
    """Registry builder: backbone reading the graph's states (V + MASK, or V) and writing V values."""
    graph = get_graph(diffusion_cfg.graph, vocab_size)
    backbone = Backbone.from_config(model_cfg, vocab_in=graph.input_vocab, vocab_out=vocab_size)
    schedule = SEDD_NOISES[diffusion_cfg.schedule or "loglinear"](diffusion_cfg)
    return SEDD(
        backbone,
        graph,
        schedule,
        sampling_eps=diffusion_cfg.sampling_eps,
        antithetic=diffusion_cfg.antithetic,
        time_conditioning=model_cfg.time_conditioning,
    )
