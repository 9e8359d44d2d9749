"""DiT-style transformer backbone shared by the families (MDLM's ``DIT``, written nanoGPT-style).

Pre-norm blocks whose LayerNorm outputs are shifted/scaled, and whose residual branches
are gated, by a conditioning vector c (adaLN, Peebles & Xie 2023). The modulation
layers start at zero, so every block starts as the identity and the network as a
constant predictor: training begins from a stable point whatever the depth.
Positions are rotary (no learned position table), so any length works.

Families build it from their ``model:`` section with :meth:`Backbone.from_config` (the
constructor takes explicit ints, so a family with a different input, e.g. Diffusion-LM's
continuous embeddings, can reuse the blocks through :meth:`Backbone.forward_embeddings`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from difflm.models.config import BackboneConfig

_B = TypeVar("_B", bound="Backbone")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift; ``1 +`` so zero-initialised modulation is the identity."""
    return x * (1 + scale) + shift


def rotary_cos_sin(length: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin tables (L, head_dim/2), float32. Computed per call (cheap) so no buffer is ever cast to bf16."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(length, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)  # (L, hd/2)
    return angles.cos(), angles.sin()


def rotary_cos_sin_at(positions: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos/sin tables (L, head_dim/2) for explicit integer positions (L,): block diffusion feeds a clean and a
    noisy copy of the same positions, and a KV-cached call feeds a slice that does not start at 0.
    Same arithmetic as :func:`rotary_cos_sin`, so positions ``arange(L)`` give the same tables bit for bit."""
    head = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (10000.0 ** (head / head_dim))
    angles = torch.outer(positions.to(torch.float32), inv_freq)  # (L, hd/2)
    return angles.cos(), angles.sin()


#: per-layer (keys, values), each (B, H, L, hd), keys already rotated: a KV cache (see :meth:`Backbone.forward`)
KV = list[tuple[Tensor, Tensor]]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, L, hd) pairs (x[:hd/2], x[hd/2:]) by position-dependent angles (GPT-NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, L, hd/2) each
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, H, L, hd)
    return out.to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Noise level (B,) -> conditioning (B, cond_dim): sinusoidal features then a 2-layer MLP (DiT)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def frequency_embedding(self, t: Tensor) -> Tensor:
        """(B,) -> (B, freq_dim) cos/sin features over geometrically spaced frequencies."""
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )  # (half,)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)

    def forward(self, t: Tensor) -> Tensor:
        emb = self.frequency_embedding(t).to(self.mlp[0].weight.dtype)  # (B, freq_dim)
        return self.mlp(emb)  # (B, cond_dim)


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, each branch modulated (shift, scale) and gated by c."""

    def __init__(self, d_model: int, n_heads: int, cond_dim: int, dropout: float, causal: bool) -> None:
        super().__init__()
        assert d_model % n_heads == 0, "n_heads must divide d_model"
        self.n_heads = n_heads
        self.causal = causal
        self.norm1 = nn.LayerNorm(d_model, bias=False)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(approximate="tanh"), nn.Linear(4 * d_model, d_model)
        )
        self.dropout = nn.Dropout(dropout)
        # 6 modulation vectors (shift/scale/gate for attention and MLP); zero => block == identity at init.
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * d_model)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None,
                past_kv: tuple[Tensor, Tensor] | None = None, kv_out: KV | None = None) -> Tensor:
        """attn_mask (Lq, Lk) bool, True = may attend (block diffusion's block-causal mask); past_kv: cached
        keys/values (B, H, Lp, hd) placed before this call's own (Lk = Lp + Lq); kv_out: this call's own
        (keys, values) are appended to it (to build a cache). All None: the plain (causal or full) attention."""
        B, L, D = x.shape
        mods = self.adaLN_modulation(c)[:, None, :]  # (B, 1, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods.chunk(6, dim=-1)  # (B, 1, D) each

        h = modulate(self.norm1(x), shift_a, scale_a)  # (B, L, D)
        qkv = self.qkv(h).view(B, L, 3, self.n_heads, D // self.n_heads)  # (B, L, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_out is not None:
            kv_out.append((k, v))
        if attn_mask is None and past_kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, hd)
        else:
            if self.causal:
                raise ValueError("attn_mask / past_kv are for bidirectional backbones (block diffusion, caches)")
            if past_kv is not None:
                k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)  # (B, H, Lp+L, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, hd)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        x = x + gate_a * self.dropout(self.attn_out(y))  # (B, L, D)

        h = modulate(self.norm2(x), shift_m, scale_m)  # (B, L, D)
        x = x + gate_m * self.dropout(self.mlp(h))  # (B, L, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm then the output projection; both zero-initialised, so initial logits are 0."""

    def __init__(self, d_model: int, vocab_out: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, bias=False)
        self.linear = nn.Linear(d_model, vocab_out)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * d_model)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, L, V)


class Backbone(nn.Module):
    """Token ids (B, L) + noise level (B,) -> logits (B, L, vocab_out)."""

    def __init__(
        self,
        vocab_in: int,
        vocab_out: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        cond_dim: int,
        dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0 or (d_model // n_heads) % 2 != 0:
            raise ValueError(f"d_model={d_model} / n_heads={n_heads} must be an even integer (rotary)")
        self.vocab_in, self.vocab_out = vocab_in, vocab_out
        self.d_model, self.n_heads, self.cond_dim = d_model, n_heads, cond_dim
        self.causal = causal
        self.embed = nn.Embedding(vocab_in, d_model)
        nn.init.kaiming_uniform_(self.embed.weight, a=math.sqrt(5))  # MDLM's init: small, like a Linear's
        self.sigma_map = TimestepEmbedder(cond_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(d_model, n_heads, cond_dim, dropout, causal) for _ in range(n_layers)
        )
        self.final = FinalLayer(d_model, vocab_out, cond_dim)

    @classmethod
    def from_config(cls: type[_B], cfg: BackboneConfig, *, vocab_in: int, vocab_out: int, **extra: Any) -> _B:
        """The backbone a ``model:`` section describes (resolved dims, dropout), reading ``vocab_in`` ids and
        writing ``vocab_out`` values; ``extra`` goes to the constructor as is (``causal=True`` for ar,
        ``bijective_blocks`` for :class:`~difflm.families.bijective.flow.BijectiveBackbone`).

        One place turns a config into dims, so a family's builder names only what is its own (the vocab
        sizes, causality) and a new backbone field reaches every family at once. Returns ``cls``."""
        d = cfg.dims()
        return cls(
            vocab_in=vocab_in,
            vocab_out=vocab_out,
            d_model=d["d_model"],
            n_layers=d["n_layers"],
            n_heads=d["n_heads"],
            cond_dim=d["cond_dim"],
            dropout=cfg.dropout,
            **extra,
        )

    def condition(self, sigma: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """Conditioning vector c (B, cond_dim). sigma None (time conditioning off) embeds sigma = 0, as MDLM,
        so c is a learned constant rather than absent: the adaLN layers stay in use."""
        if sigma is None:
            sigma = torch.zeros(batch, device=device)
        return F.silu(self.sigma_map(sigma))  # (B, cond_dim)

    def hidden(self, x: Tensor, c: Tensor, *, positions: Tensor | None = None, attn_mask: Tensor | None = None,
               past_kv: KV | None = None, kv_out: KV | None = None) -> Tensor:
        """Run the blocks on input embeddings x (B, L, D) under conditioning c; returns (B, L, D).

        Optional (all None: the plain forward, unchanged bit for bit): ``positions`` (L,) rotary positions
        (default arange(L)); ``attn_mask`` (L, Lp + L) bool, True = may attend; ``past_kv`` one cached
        (keys, values) per block for Lp earlier positions, attended before this call's own; ``kv_out`` a
        list that receives each block's own (keys, values), to build such a cache."""
        hd = self.d_model // self.n_heads
        if positions is None:
            cos, sin = rotary_cos_sin(x.shape[1], hd, x.device)  # (L, hd/2) each
        else:
            cos, sin = rotary_cos_sin_at(positions, hd)
        if attn_mask is None and past_kv is None and kv_out is None:
            for block in self.blocks:
                x = block(x, c, cos, sin)  # (B, L, D)
            return x
        for i, block in enumerate(self.blocks):
            x = block(x, c, cos, sin, attn_mask, None if past_kv is None else past_kv[i], kv_out)  # (B, L, D)
        return x

    def forward_embeddings(self, x: Tensor, c: Tensor) -> Tensor:
        """Embeddings (B, L, D) + conditioning (B, cond_dim) -> logits (B, L, vocab_out).

        The entry point for families whose inputs are not token ids (continuous embeddings)."""
        return self.final(self.hidden(x, c), c)  # (B, L, V)

    @overload
    def forward(self, ids: Tensor, sigma: Tensor | None = None, return_hidden: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(self, ids: Tensor, sigma: Tensor | None, return_hidden: Literal[True]) -> tuple[Tensor, Tensor]: ...

    def forward(self, ids: Tensor, sigma: Tensor | None = None, return_hidden: bool = False, *,
                positions: Tensor | None = None, attn_mask: Tensor | None = None, past_kv: KV | None = None,
                kv_out: KV | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, L, vocab_out); with ``return_hidden`` also the final blocks' hidden states (B, L, D)
        (before the output layer's norm), for heads that read the backbone's features (mdlm's ATAT
        importance estimator). The default return is unchanged: logits only.

        positions / attn_mask / past_kv / kv_out: block diffusion's masks and KV caches (see :meth:`hidden`);
        left None, the forward is exactly the plain one."""
        B = ids.shape[0]
        x = self.embed(ids)  # (B, L, D)
        c = self.condition(sigma, B, ids.device)  # (B, cond_dim)
        if positions is not None or attn_mask is not None or past_kv is not None or kv_out is not None:
            h = self.hidden(x, c, positions=positions, attn_mask=attn_mask, past_kv=past_kv, kv_out=kv_out)
            return (self.final(h, c), h) if return_hidden else self.final(h, c)
        if not return_hidden:
            return self.forward_embeddings(x, c)  # (B, L, V)
        h = self.hidden(x, c)  # (B, L, D)
        return self.final(h, c), h  # (B, L, V), (B, L, D)
