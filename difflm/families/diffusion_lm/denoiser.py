"""Denoisers for continuous-embedding diffusion: noisy embeddings (B, L, E) + time -> predicted x0 (B, L, E).

Diffusion-LM's network works in a small embedding space (E = 16..128) but thinks in a wide
one (d_model): an input projection ``E -> d_model`` (Linear, tanh, Linear, as the original's
``input_up_proj``), the blocks, and an adaLN-modulated output layer ``d_model -> E``. Two
implementations share that surface (``condition``, ``forward_embeddings``, ``forward``):

* :class:`DiTDenoiser` (``backbone: transformer``, the default): the project's own DiT blocks
  (rotary positions, adaLN on every block).
* :class:`difflm.families.diffusion_lm.bart.BartDenoiser` (``backbone: bart``): a Hugging Face BART encoder.

Time conditioning (:class:`TimeConditioner`): the step t is given as a fraction t/T in [0, 1),
multiplied by ``1000 * exp(log_scale)`` with ``log_scale`` a learned scalar (init 0, i.e. the
improved-diffusion convention of rescaling any T to 1000 steps), then the DiT sinusoidal
embedding + MLP. The learned scale lets the network stretch the time axis, i.e. move its
sinusoid frequencies, instead of relying on the fixed 1000 rescaling; normalising by T keeps
the features in the same range whatever ``timesteps`` is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.models.backbone import DiTBlock, FinalLayer, TimestepEmbedder, rotary_cos_sin


class TimeConditioner(nn.Module):
    """t/T (B,) in [0, 1] -> conditioning c (B, cond_dim): sinusoidal features of a learned-scale time + MLP."""

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.embedder = TimestepEmbedder(cond_dim)
        self.log_scale = nn.Parameter(torch.zeros(1))  # (1,), not 0-dim: DeepSpeed cannot flatten 0-dim params

    def forward(self, t_frac: Tensor) -> Tensor:
        time = t_frac.float() * (1000.0 * self.log_scale.float().exp())  # (B,)
        return F.silu(self.embedder(time))  # (B, cond_dim)


def input_projection(embed_dim: int, d_model: int) -> nn.Sequential:
    """E -> d_model: Linear, tanh, Linear (Diffusion-LM's input_up_proj)."""
    return nn.Sequential(nn.Linear(embed_dim, d_model), nn.Tanh(), nn.Linear(d_model, d_model))


class DiTDenoiser(nn.Module):
    """x0-predictor on the project's DiT blocks. The output layer starts at zero, so at init x0_hat = 0."""

    def __init__(
        self,
        embed_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        cond_dim: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0 or (d_model // n_heads) % 2 != 0:
            raise ValueError(f"d_model={d_model} / n_heads={n_heads} must be an even integer (rotary)")
        self.embed_dim, self.d_model, self.n_heads = embed_dim, d_model, n_heads
        self.in_proj = input_projection(embed_dim, d_model)
        self.time = TimeConditioner(cond_dim)
        self.blocks = nn.ModuleList(DiTBlock(d_model, n_heads, cond_dim, dropout, causal=False) for _ in range(n_layers))
        self.final = FinalLayer(d_model, embed_dim, cond_dim)

    def condition(self, t_frac: Tensor) -> Tensor:
        """t/T (B,) -> c (B, cond_dim)."""
        return self.time(t_frac)

    def forward_embeddings(self, x: Tensor, c: Tensor) -> Tensor:
        """Noisy embeddings x (B, L, E) under conditioning c (B, cond_dim) -> x0 prediction (B, L, E)."""
        h = self.in_proj(x.to(self.in_proj[0].weight.dtype))  # (B, L, D)
        cos, sin = rotary_cos_sin(h.shape[1], self.d_model // self.n_heads, h.device)  # (L, hd/2) each
        for block in self.blocks:
            h = block(h, c, cos, sin)  # (B, L, D)
        return self.final(h, c)  # (B, L, E)

    def forward(self, x: Tensor, t_frac: Tensor) -> Tensor:
        return self.forward_embeddings(x, self.condition(t_frac))  # (B, L, E)
