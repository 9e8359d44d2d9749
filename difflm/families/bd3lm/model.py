"""BD3-LM: block diffusion language model (Arriola et al., ICLR 2025).

The sequence is cut into blocks of ``block_size`` tokens. The model factorises autoregressively over
blocks, p(x) = prod_b p(x^b | x^{<b}), and each conditional is an MDLM (absorbing masks, SUBS) over the
block's tokens. Its NELBO is therefore the sum over blocks of MDLM's per-block NELBO given the *clean*
earlier blocks: block_size = seq_len is MDLM exactly; block_size = 1 is an autoregressive model (a
lone masked token predicted from the clean tokens before it; its NELBO is the exact next-token NLL).

Vectorised training (BD3-LMs' trick): one forward over the 2L-token input [x_t, x0] (noised and clean
copies, both at positions 0..L-1), with the attention mask of :func:`block_diffusion_mask`: a noisy
block b attends to its own noisy block and to the clean blocks < b; a clean block attends to the clean
blocks <= b (block-causal). The logits of the noisy half are scored as MDLM's, so every block is
trained in the same pass. Each block draws its own time t (antithetic over the batch's blocks).

``val/nll`` (:meth:`BD3LM.val_nll`) is MDLM's masking-rate NELBO with this forward: draw k masks the
counted tokens at the shared rate m_k and scores (w_k / m_k) * sum of masked CE, an unbiased estimate
of every block's NELBO at once, on the same counted tokens with the same noise as every family. It is
an upper bound on the NLL, the same kind of number as mdlm's (which is the block_size = L case).

Clipped noise (``diffusion.noise_clip: [beta, omega]``, BD3-LMs' "clipped schedule"): training masking
rates are uniform in [beta, omega], weighted 1/m (the NELBO integrand); rates near 0 carry almost no
signal and rates near 1 make small blocks high-variance. val/nll is unchanged (full range).
``diffusion.clip_search`` picks the range from data at each eval point (:meth:`BD3LM.val_tune`, the
:class:`difflm.types.ValTuner` hook; clipped.py); ``diffusion.resample_masks`` keeps each block's masked
share inside the range. The range in use lives in the int64 buffer ``clip_range`` (millionths), so it is
saved with the weights and a resumed run continues with the searched range.
"""

from __future__ import annotations

from types import EllipsisType
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from difflm.families.base import DenoiseResult, LossOutput
from difflm.families.bd3lm import clipped
from difflm.families.mdlm.model import MDLM
from difflm.models.backbone import Backbone
from difflm.schedules import NoiseSchedule, get_schedule, sample_times
from difflm.types import ValTuning

if TYPE_CHECKING:
    from difflm.families.bd3lm.config import Bd3lmConfig, Bd3lmModelConfig, ClipSearchConfig

#: The clip_range buffer stores millionths as int64: DeepSpeed's bf16 mode casts every float buffer to bf16,
#: which would turn 0.3 into 0.3008 across a save/resume.
CLIP_SCALE = 1_000_000


def block_ids(length: int, block_size: int, device: torch.device) -> Tensor:
    """Block index of each position (length,)."""
    return torch.arange(length, device=device) // block_size


def block_diffusion_mask(length: int, block_size: int, device: torch.device) -> Tensor:
    """(2L, 2L) bool, True = may attend, for the input [x_t (L), x0 (L)].

    noisy b -> noisy b (block-diagonal); noisy b -> clean < b (offset block-causal);
    clean b -> clean <= b (block-causal); clean -> noisy never."""
    blk = block_ids(length, block_size, device)
    q, k = blk[:, None], blk[None, :]
    top = torch.cat([q == k, k < q], dim=1)  # (L, 2L) rows of x_t
    bottom = torch.cat([torch.zeros(length, length, dtype=torch.bool, device=device), k <= q], dim=1)  # x0 rows
    return torch.cat([top, bottom], dim=0)


class BD3LM(MDLM):
    """Block diffusion on the shared (bidirectional) backbone; a masked-diffusion family (mask id = vocab_size)."""

    name = "bd3lm"

    def __init__(self, backbone: Backbone, vocab_size: int, schedule: NoiseSchedule, *, block_size: int,
                 noise_clip: tuple[float, float] | None = None, sampling_eps: float = 1e-3,
                 antithetic: bool = True, clip_search: ClipSearchConfig | None = None,
                 resample_masks: bool = False) -> None:
        super().__init__(backbone, vocab_size, schedule, sampling_eps=sampling_eps, antithetic=antithetic)
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        if resample_masks and (block_size < 2 or (noise_clip is None and clip_search is None)):
            raise ValueError("resample_masks needs block_size >= 2 and a clip range (noise_clip or clip_search)")
        self.block_size = block_size
        self.clip_search = clip_search
        self.resample_masks = resample_masks
        if noise_clip is None and clip_search is not None:
            noise_clip = (float(sampling_eps), 1.0)  # a search starts from the full range (BD3-LMs' default)
        #: the training clip range in use (a host copy of the clip_range buffer: no device read per step)
        self.noise_clip: tuple[float, float] | None = None
        if noise_clip is not None:
            self.register_buffer("clip_range", torch.zeros(2, dtype=torch.int64))
            self.set_noise_clip(noise_clip)

    def set_noise_clip(self, clip: tuple[float, float]) -> None:
        """Train on masking rates in ``clip`` = [beta, omega] from now on (the buffer and its host copy)."""
        self.clip_range.copy_(torch.tensor([round(c * CLIP_SCALE) for c in clip], dtype=torch.int64))
        self.noise_clip = (float(clip[0]), float(clip[1]))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Weights saved without ``clip_range`` (before the clip search existed, or without a clip) keep the
        spec's starting range; a saved range this model does not use (the spec has no clip) is ignored."""
        key = prefix + "clip_range"
        if self.noise_clip is None:
            state_dict.pop(key, None)
        elif key not in state_dict:
            state_dict[key] = self.clip_range.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.noise_clip is not None:
            lo, hi = (int(v) for v in self.clip_range.tolist())
            self.noise_clip = (lo / CLIP_SCALE, hi / CLIP_SCALE)

    def configure(self, diffusion: Any) -> None:
        """bd3lm has no stage switches."""

    # ---- the block-causal forward ------------------------------------------------------------

    def denoiser_logits(self, xt: Tensor, x0: Tensor, sigma: Tensor | None = None) -> Tensor:
        """Backbone logits (B, L, V+1) at the noisy positions: one pass over [x_t, x0] with the block mask
        (no time conditioning: sigma is unused). MDLM's val_nll scores through this, so it is bd3lm's too."""
        B, L = xt.shape
        pos = torch.arange(L, device=xt.device)
        mask = block_diffusion_mask(L, self.block_size, xt.device)
        logits = self.backbone(torch.cat([xt, x0], dim=1), None, positions=torch.cat([pos, pos]), attn_mask=mask)
        return logits[:, :L]  # (B, L, V+1)

    def block_times(self, B: int, L: int, device: torch.device, generator: torch.Generator | None,
                    clip: tuple[float, float] | None | EllipsisType = ...) -> tuple[Tensor, Tensor]:
        """Per-token masking rate (B, L) and NELBO weight (B, L): one time per block, antithetic over all blocks.

        ``clip`` ``...`` (default): the training range in use (``self.noise_clip``). None: the schedule's draw;
        with one block this is MDLM's draw (``sample_times(B)``), so block_size >= L reproduces mdlm's loss.
        [beta, omega]: rates uniform in it, weight 1/m."""
        if clip is ...:
            clip = self.noise_clip
        nb = -(-L // self.block_size)
        if clip is None:
            t = self.sample_times(B * nb, device, generator).view(B, nb)
            t = t.repeat_interleave(self.block_size, dim=1)[:, :L]  # (B, L)
            return self.schedule.move_chance(t), self.schedule.nelbo_weight(t)
        lo, hi = clip
        u = sample_times(B * nb, sampling_eps=0.0, antithetic=self.antithetic, device=device,
                         dtype=self.float_dtype(), generator=generator).view(B, nb)
        m = (lo + (hi - lo) * u).repeat_interleave(self.block_size, dim=1)[:, :L]  # (B, L)
        return m, 1.0 / m

    def loss_terms(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None,
                   clip: tuple[float, float] | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token NELBO terms, masked CE and masks (B, L) of the training draw with masking rates in ``clip``
        (None: the schedule's); with ``resample_masks`` each block's masked share is kept in the range."""
        B, L = tokens.shape
        move, weight = self.block_times(B, L, tokens.device, generator, clip)  # (B, L) each
        noise = torch.rand(B, L, generator=generator, device=tokens.device, dtype=move.dtype)  # (B, L)
        masked = (noise < move) & valid
        if self.resample_masks and clip is not None:
            masked = clipped.resample_block_masks(masked, move, valid, self.block_size, clip,
                                                  lower=clip[0] > self.sampling_eps, generator=generator)
        xt = torch.where(masked, self.mask_id, tokens)
        ce = self.subs_ce(self.denoiser_logits(xt, tokens), tokens).masked_fill(~masked, 0.0)  # (B, L)
        nelbo_tok = torch.where(masked, weight, 0.0) * ce  # (B, L)
        return nelbo_tok, ce, masked

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """Block NELBO on clean tokens (B, L), averaged over the ``valid`` (counted) tokens; only they are noised."""
        nelbo_tok, ce, masked = self.loss_terms(tokens, valid, generator, self.noise_clip)
        return self.loss_output(nelbo_tok, ce, masked, valid)

    # ---- the data-driven clip search (the optional ValTuner hook) --------------------------------

    def clip_candidates(self) -> list[tuple[float, float]]:
        """The ranges a search compares (clipped.candidate_ranges); empty without diffusion.clip_search."""
        if self.clip_search is None:
            return []
        return clipped.candidate_ranges(self.clip_search.widths, self.clip_search.delta, self.sampling_eps,
                                        self.block_size)

    def val_tune_batches(self) -> int:
        """Val micro-batches the clip search scores per eval point (0: no search)."""
        return self.clip_search.batches if self.clip_search is not None else 0

    @torch.no_grad()
    def val_tune(self, batches: list[tuple[Tensor, Tensor]], generator: torch.Generator,
                 all_reduce: Callable[[Tensor], Tensor]) -> ValTuning:
        """BD3-LMs' var_min search: each candidate's summed variance of per-block losses over ``batches``
        (clipped.search; moments summed over workers by ``all_reduce``), then train on the argmin (unless
        clip_search.update is false). Returns the variances (per batch) and the range in use."""
        cands = self.clip_candidates()
        if not cands or not batches:
            return ValTuning()
        var = clipped.search(lambda x, c, g, r: self.loss_terms(x, c, g, r)[0], cands, batches, self.block_size,
                             generator, all_reduce)
        best = int(torch.argmin(var))  # the first of equal minima: the full range wins a tie
        before = self.noise_clip
        assert self.clip_search is not None
        if self.clip_search.update:
            self.set_noise_clip(cands[best])
        per_batch = (var / len(batches)).tolist()
        scalars = {f"clip_var_{lo:.3f}_{hi:.3f}": v for (lo, hi), v in zip(cands, per_batch)}
        lo, hi = self.noise_clip or cands[best]
        full = per_batch[0]
        message = (f"clip search: training masking rates [{lo:.3f}, {hi:.3f}]"
                   f"{'' if self.noise_clip != before else ' (unchanged)'}; least loss variance of "
                   f"{len(cands)} ranges [{cands[best][0]:.3f}, {cands[best][1]:.3f}] {per_batch[best]:.4g} "
                   f"vs full range {full:.4g}")
        return ValTuning(scalars=scalars, metrics={"clip_beta": lo, "clip_omega": hi,
                                                   "clip_var": per_batch[best], "clip_var_full": full},
                         message=message)

    # ---- sampling / denoise ----------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, tokens: Tensor, valid: Tensor, t: float, generator: torch.Generator | None = None,
                steps: int | None = None) -> DenoiseResult:
        """Mask each ``valid`` token with probability move_chance(t); reconstruct each block in one pass given
        the clean blocks before it (what the training loss scores). ``steps`` is not supported."""
        if steps:
            raise ValueError("bd3lm denoise reconstructs in one pass (steps 0); sample with `difflm sample` instead")
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"noise level t must be in [0, 1], got {t}")
        B, L = tokens.shape
        tt = torch.full((B,), float(t), device=tokens.device, dtype=self.float_dtype())
        noise = torch.rand(B, L, generator=generator, device=tokens.device, dtype=tt.dtype)
        noised = (noise < self.schedule.move_chance(tt)[:, None]) & valid
        xt = torch.where(noised, self.mask_id, tokens)
        logits = self.denoiser_logits(xt, tokens)[..., : self.mask_id]
        recon = torch.where(noised, logits.argmax(dim=-1), tokens)
        n_valid, n_noised = valid.sum().clamp(min=1), noised.sum()
        correct = recon == tokens
        metrics = {"mask_rate": float(n_noised / n_valid), "accuracy": float((correct & valid).sum() / n_valid),
                   "masked_accuracy": float((correct & noised).sum() / n_noised) if int(n_noised) else float("nan")}
        return DenoiseResult(corrupted=xt, noised=noised, reconstructed=recon, metrics=metrics,
                             method=f"one-shot per block of {self.block_size}: argmax given the clean earlier blocks")


def build_bd3lm(model_cfg: Bd3lmModelConfig, diffusion_cfg: Bd3lmConfig, vocab_size: int, **special_ids: Any) -> BD3LM:
    """Registry builder; special ids are not used."""
    backbone = Backbone.from_config(model_cfg, vocab_in=vocab_size + 1, vocab_out=vocab_size + 1)
    return BD3LM(backbone, vocab_size, get_schedule(diffusion_cfg.schedule, diffusion_cfg.eps),
                 block_size=diffusion_cfg.block_size, noise_clip=diffusion_cfg.noise_clip,
                 sampling_eps=diffusion_cfg.sampling_eps, antithetic=diffusion_cfg.antithetic,
                 clip_search=diffusion_cfg.clip_search, resample_masks=diffusion_cfg.resample_masks)
