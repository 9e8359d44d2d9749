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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from difflm.families.base import DenoiseResult, LossOutput
from difflm.families.mdlm.model import MDLM
from difflm.models.backbone import Backbone
from difflm.schedules import NoiseSchedule, get_schedule, sample_times

if TYPE_CHECKING:
    from difflm.families.bd3lm.config import Bd3lmConfig, Bd3lmModelConfig


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
                 antithetic: bool = True) -> None:
        super().__init__(backbone, vocab_size, schedule, sampling_eps=sampling_eps, antithetic=antithetic)
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.noise_clip = noise_clip

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

    def block_times(self, B: int, L: int, device: torch.device, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Per-token masking rate (B, L) and NELBO weight (B, L): one time per block, antithetic over all blocks.

        With one block this is MDLM's draw (``sample_times(B)``), so block_size >= L reproduces mdlm's loss."""
        nb = -(-L // self.block_size)
        if self.noise_clip is None:
            t = self.sample_times(B * nb, device, generator).view(B, nb)
            t = t.repeat_interleave(self.block_size, dim=1)[:, :L]  # (B, L)
            return self.schedule.move_chance(t), self.schedule.nelbo_weight(t)
        lo, hi = self.noise_clip
        u = sample_times(B * nb, sampling_eps=0.0, antithetic=self.antithetic, device=device,
                         dtype=self.float_dtype(), generator=generator).view(B, nb)
        m = (lo + (hi - lo) * u).repeat_interleave(self.block_size, dim=1)[:, :L]  # (B, L)
        return m, 1.0 / m

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """Block NELBO on clean tokens (B, L), averaged over the ``valid`` (counted) tokens; only they are noised."""
        B, L = tokens.shape
        move, weight = self.block_times(B, L, tokens.device, generator)  # (B, L) each
        noise = torch.rand(B, L, generator=generator, device=tokens.device, dtype=move.dtype)  # (B, L)
        masked = (noise < move) & valid
        xt = torch.where(masked, self.mask_id, tokens)
        ce = self.subs_ce(self.denoiser_logits(xt, tokens), tokens).masked_fill(~masked, 0.0)  # (B, L)
        nelbo_tok = torch.where(masked, weight, 0.0) * ce  # (B, L)
        return self.loss_output(nelbo_tok, ce, masked, valid)

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
                 sampling_eps=diffusion_cfg.sampling_eps, antithetic=diffusion_cfg.antithetic)
