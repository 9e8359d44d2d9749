"""Invertible transformer blocks: affine coupling over channel halves (RealNVP / Glow / RevNet style).

A :class:`CouplingBlock` splits the hidden state x (B, L, D) into channel halves (x1, x2) and maps

    y1 = x1 * exp(s1(x2)) + t1(x2)
    y2 = x2 * exp(s2(y1)) + t2(y1)

where each (s, t) comes from a sub-network on one half: a DiT block of width D/2 (attention over the
whole sequence + MLP, adaLN-conditioned on c, rotary positions) and a zero-initialised projection to
2 x D/2. Because s1, t1 read only x2 and s2, t2 read only y1, the Jacobian of the whole map on the
(L x D) input is block-triangular, so

    log |det J| = sum over positions and channels of (s1 + s2)     (exact, no approximation)

and the inverse is exact: x2 = (y2 - t2(y1)) exp(-s2(y1)), then x1 = (y1 - t1(x2)) exp(-s1(x2)).
Attention mixing positions does not break this: it lives inside s and t. The scales are soft-clamped,
``s = 2 tanh(raw / 2)``, so one block scales a channel by at most e^2 either way.

:class:`BijectiveBackbone` is the project's :class:`~difflm.models.backbone.Backbone` whose first
``bijective_blocks`` blocks are coupling blocks: embedding -> RMS normalisation (no learned scale: the
flow's input has a fixed scale, so the density cannot be raised by shrinking the embedding table) ->
coupling blocks -> the remaining ordinary DiT blocks -> the adaLN output layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.models.backbone import KV, Backbone, DiTBlock, rotary_cos_sin, rotary_cos_sin_at

#: soft clamp of the coupling log-scales: |s| < S_MAX per block and channel
S_MAX = 2.0


def check_coupling_dims(d_model: int, n_heads: int) -> None:
    """ValueError unless d_model splits into halves that n_heads attention heads of even width can read."""
    if d_model % 2 != 0 or (d_model // 2) % n_heads != 0 or ((d_model // 2) // n_heads) % 2 != 0:
        raise ValueError(
            f"invertible blocks split d_model={d_model} into halves read by n_heads={n_heads} heads of even width: "
            "d_model / 2 / n_heads must be an even integer (e.g. d_model 128 with 4 heads)"
        )


class CouplingBlock(nn.Module):
    """Two affine couplings (one per channel half) with attention/MLP sub-networks; identity at init."""

    def __init__(self, d_model: int, n_heads: int, cond_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        check_coupling_dims(d_model, n_heads)
        half = d_model // 2
        self.half, self.n_heads = half, n_heads
        self.net1 = DiTBlock(half, n_heads, cond_dim, dropout, causal=False)
        self.net2 = DiTBlock(half, n_heads, cond_dim, dropout, causal=False)
        self.proj1 = nn.Linear(half, 2 * half)
        self.proj2 = nn.Linear(half, 2 * half)
        for layer in (self.proj1, self.proj2):  # s = t = 0: the block starts as the identity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def _scale_shift(net: DiTBlock, proj: nn.Linear, h: Tensor, c: Tensor, cos: Tensor, sin: Tensor,
                     past: tuple[Tensor, Tensor] | None = None, kv_out: KV | None = None) -> tuple[Tensor, Tensor]:
        raw_s, t = proj(net(h, c, cos, sin, None, past, kv_out)).chunk(2, dim=-1)  # (B, L, D/2) each
        return S_MAX * torch.tanh(raw_s / S_MAX), t

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor, past_kv: KV | None = None,
                kv_out: KV | None = None) -> tuple[Tensor, Tensor]:
        """x (B, L, D) -> (y (B, L, D), per-position log|det J| contribution (B, L)); the sum over positions
        is the exact log|det| of this block's Jacobian on the whole (L x D) input.

        past_kv / kv_out (sampling caches only): the two sub-networks' cached (keys, values), net1's then
        net2's, as :meth:`difflm.models.backbone.DiTBlock.forward` takes them."""
        x1, x2 = x.chunk(2, dim=-1)  # (B, L, D/2) each
        p1, p2 = (None, None) if past_kv is None else past_kv
        s1, t1 = self._scale_shift(self.net1, self.proj1, x2, c, cos, sin, p1, kv_out)
        y1 = x1 * torch.exp(s1) + t1
        s2, t2 = self._scale_shift(self.net2, self.proj2, y1, c, cos, sin, p2, kv_out)
        y2 = x2 * torch.exp(s2) + t2
        return torch.cat([y1, y2], dim=-1), s1.sum(dim=-1) + s2.sum(dim=-1)

    def inverse(self, y: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The exact inverse of :meth:`forward` (same c, same positions; eval mode if dropout is on)."""
        y1, y2 = y.chunk(2, dim=-1)
        s2, t2 = self._scale_shift(self.net2, self.proj2, y1, c, cos, sin)
        x2 = (y2 - t2) * torch.exp(-s2)
        s1, t1 = self._scale_shift(self.net1, self.proj1, x2, c, cos, sin)
        x1 = (y1 - t1) * torch.exp(-s1)
        return torch.cat([x1, x2], dim=-1)


class BijectiveBackbone(Backbone):
    """Token ids (B, L) + noise level -> logits, with the first ``bijective_blocks`` blocks invertible."""

    def __init__(
        self,
        vocab_in: int,
        vocab_out: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        cond_dim: int,
        dropout: float = 0.0,
        bijective_blocks: int | None = None,
    ) -> None:
        k = n_layers if bijective_blocks is None else bijective_blocks
        if not 1 <= k <= n_layers:
            raise ValueError(f"bijective_blocks={k} must be between 1 and n_layers={n_layers}")
        check_coupling_dims(d_model, n_heads)
        super().__init__(vocab_in, vocab_out, d_model, n_layers - k, n_heads, cond_dim, dropout, causal=False)
        self.flow = nn.ModuleList(CouplingBlock(d_model, n_heads, cond_dim, dropout) for _ in range(k))

    def flow_input(self, ids: Tensor) -> Tensor:
        """The flow's input h (B, L, D): token embeddings RMS-normalised to unit mean square (no learned scale)."""
        e = self.embed(ids)  # (B, L, D)
        return F.rms_norm(e, (e.shape[-1],))

    def _rotary(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return rotary_cos_sin(length, self.d_model // 2 // self.n_heads, device)  # sub-networks are D/2 wide

    def flow_forward(self, h: Tensor, c: Tensor, *, positions: Tensor | None = None, past_kv: KV | None = None,
                     kv_out: KV | None = None) -> tuple[Tensor, Tensor]:
        """h (B, L, D) -> (z (B, L, D), per-position log|det J| (B, L)); summed over positions it is the exact
        log|det| of the Jacobian dz/dh of the whole sequence. ``positions`` / ``past_kv`` (two entries per
        coupling block) / ``kv_out``: the sampling caches of :meth:`forward`; all None, the plain flow."""
        if positions is None:
            cos, sin = self._rotary(h.shape[1], h.device)
        else:
            cos, sin = rotary_cos_sin_at(positions, self.d_model // 2 // self.n_heads)
        logdet = torch.zeros(h.shape[:2], device=h.device, dtype=h.dtype)  # (B, L)
        for i, block in enumerate(self.flow):
            pair = None if past_kv is None else (past_kv[2 * i], past_kv[2 * i + 1])
            h, ld = block(h, c, cos, sin, pair, kv_out)
            logdet = logdet + ld
        return h, logdet

    def flow_inverse(self, z: Tensor, c: Tensor) -> Tensor:
        """The exact inverse of :meth:`flow_forward`: z (B, L, D) -> h (B, L, D)."""
        cos, sin = self._rotary(z.shape[1], z.device)
        for block in reversed(self.flow):
            z = block.inverse(z, c, cos, sin)
        return z

    def forward_flow(self, ids: Tensor, sigma: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """ids (B, L) -> (logits (B, L, V), flow output z (B, L, D), per-position log|det J| (B, L))."""
        c = self.condition(sigma, ids.shape[0], ids.device)  # (B, cond_dim)
        z, logdet = self.flow_forward(self.flow_input(ids), c)
        return self.forward_embeddings(z, c), z, logdet

    def forward(self, ids: Tensor, sigma: Tensor | None = None, *, positions: Tensor | None = None,
                past_kv: KV | None = None, kv_out: KV | None = None) -> Tensor:
        """Logits (B, L, V). ``positions`` / ``past_kv`` / ``kv_out``: Fast-dLLM's prefix/dual KV caches when
        sampling (difflm.families.mdlm.fast), as :meth:`Backbone.forward` takes them. The cache holds two
        entries per coupling block (its sub-networks, D/2 wide) and then one per ordinary block. All None:
        the plain forward, unchanged bit for bit."""
        if positions is None and past_kv is None and kv_out is None:
            return self.forward_flow(ids, sigma)[0]  # (B, L, V)
        c = self.condition(sigma, ids.shape[0], ids.device)  # (B, cond_dim)
        k = 2 * len(self.flow)  # cache entries of the coupling blocks, then one per ordinary block
        z, _ = self.flow_forward(self.flow_input(ids), c, positions=positions,
                                 past_kv=None if past_kv is None else past_kv[:k], kv_out=kv_out)
        rest = None if past_kv is None else past_kv[k:]
        return self.final(self.hidden(z, c, positions=positions, past_kv=rest, kv_out=kv_out), c)  # (B, L, V)
