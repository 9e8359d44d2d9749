"""AR: the autoregressive baseline, on the same backbone with causal attention and no time conditioning.

Its NLL is exact (not a bound): position i is predicted from positions < i. Position 0
has no prefix, so it is never predicted: ``num_tokens`` counts the ``valid`` targets of
positions 1..L-1. The trainer and validation pass :func:`difflm.evaluation.counted_positions`
(positions 1..L-2: never BOS, never the packer's block-final EOS), so ar's per-token NLL
covers exactly the tokens the diffusion families' NELBO covers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from difflm.families.base import Family, wide_float
from difflm.families.config import DiffusionConfig
from difflm.models.backbone import Backbone
from difflm.models.config import ModelConfig
from difflm.types import LossOutput, ValNoise


class AR(Family):
    """Next-token prediction. ``bos_id`` is the token that starts unconditional samples (samplers.py).

    No ``denoise`` hook: ar has no noise process, so there is nothing to corrupt and reconstruct."""

    name = "ar"
    exact_likelihood = True

    def __init__(self, backbone: Backbone, vocab_size: int, bos_id: int | None = None) -> None:
        super().__init__()
        if not backbone.causal:
            raise ValueError("the ar family needs a causal backbone")
        if backbone.vocab_in != vocab_size or backbone.vocab_out != vocab_size:
            raise ValueError("the ar backbone needs vocab_in == vocab_out == vocab_size")
        if bos_id is not None and not 0 <= bos_id < vocab_size:
            raise ValueError(f"bos_id={bos_id} is outside the vocab [0, {vocab_size})")
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.bos_id = bos_id

    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """Mean NLL of tokens[:, 1:] given their prefixes, over valid targets. ``generator`` is unused
        (no noise); kept for the Family interface. No host sync."""
        B, L = tokens.shape
        # Full length in (static shapes; the last position's logits are unused), causal => same result.
        logits = self.backbone(tokens)[:, :-1]  # (B, L-1, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        targets = tokens[:, 1:]  # (B, L-1)
        counted = valid[:, 1:]  # (B, L-1)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(B, L - 1)
        nll = nll.masked_fill(~counted, 0.0)  # (B, L-1)
        num_tokens = counted.sum()  # int64 scalar
        loss = nll.sum() / num_tokens.clamp(min=1).to(nll.dtype)
        return LossOutput(
            loss=loss,
            nll_sum=nll.detach().sum(dtype=wide_float(tokens.device)),
            num_tokens=num_tokens,
            metrics={"ce": loss.detach()},
        )

    @torch.no_grad()
    def val_nll(self, tokens: Tensor, counted: Tensor, noise: ValNoise) -> Tensor:
        """The exact per-sequence NLL over counted targets (B,), repeated for the K draws: (B, K).

        No noise, so every draw is the same (standard error 0) and the noise is not used beyond
        its draw count. Position 0 has no prefix: it is never a target, counted or not."""
        B, L = tokens.shape
        logits = self.backbone(tokens)[:, :-1]  # (B, L-1, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(B, L - 1)
        nll = nll.masked_fill(~counted[:, 1:], 0.0).sum(dim=-1, dtype=wide_float(tokens.device))  # (B,)
        return nll[:, None].expand(B, noise.samples).contiguous()


def build_ar(
    model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int, **special_ids: Any
) -> AR:
    """Registry builder. Reads ``bos_id`` from special_ids; diffusion_cfg and time_conditioning are unused."""
    backbone = Backbone.from_config(model_cfg, vocab_in=vocab_size, vocab_out=vocab_size, causal=True)
    return AR(backbone, vocab_size, bos_id=special_ids.get("bos_id"))
