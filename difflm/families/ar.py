"""AR: the autoregressive baseline, on the same backbone with causal attention and no time conditioning.

Its NLL is exact (not a bound): position i is predicted from positions < i. Position 0
has no prefix, so it is never predicted: ``num_tokens`` counts the valid targets of
positions 1..L-1 (with BOS-led blocks that is every real token after BOS). Compare it
with the diffusion families' per-token NELBO knowing that.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from difflm.families.base import wide_float, DenoiseResult, Family, LossOutput
from difflm.families.config import DiffusionConfig
from difflm.families.registry import FamilySpec, register_family
from difflm.models.backbone import Backbone
from difflm.models.config import ModelConfig
from difflm.sampling import ar_samplers
from difflm.sampling.core import SampleOptions, Sampler


class AR(Family):
    """Next-token prediction. ``bos_id`` is the token that starts unconditional samples (see :meth:`sample`)."""

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
    def sample(
        self,
        num: int,
        length: int,
        steps: int,
        generator: torch.Generator | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """Left-to-right ancestral sampling -> (num, length) int64. ``steps`` is ignored (one token per step).

        Starts from ``prefix`` (num, P) when given, else from ``bos_id``; with neither, the first
        token is drawn uniformly from the vocab, since the model has no distribution for position 0.
        No KV cache: each step re-runs the growing prefix (fine at eval-sample sizes)."""
        if prefix is None:
            return ar_samplers.ancestral(self, SampleOptions(num=num, length=length, steps=steps), generator).tokens
        prefix = prefix.to(device=self.device, dtype=torch.long)  # (N, P)
        p = prefix.shape[1]
        if p >= length:
            return prefix[:, :length]
        template = torch.zeros(num, length, dtype=torch.long, device=self.device)  # (N, L)
        template[:, :p] = prefix
        fixed = torch.zeros(num, length, dtype=torch.bool, device=self.device)  # (N, L)
        fixed[:, :p] = True
        opts = SampleOptions(num=num, length=length, steps=steps, template=template, fixed=fixed)
        return ar_samplers.ancestral(self, opts, generator).tokens

    def samplers(self) -> dict[str, Sampler]:
        """``ancestral``: left to right, prefix prompts, temperature and top-p."""
        return {"ancestral": functools.partial(ar_samplers.ancestral, self)}

    def denoise(
        self, tokens: Tensor, valid: Tensor, t: float, generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> DenoiseResult:
        """ar has no noise process, so there is nothing to corrupt or reconstruct."""
        raise NotImplementedError(
            "the ar family has no noise process: there is nothing to corrupt and reconstruct; "
            "denoise works with diffusion families (e.g. mdlm). Use `difflm eval` for ar's exact NLL"
        )

    @torch.no_grad()
    def nll_samples(
        self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None, samples: int
    ) -> tuple[Tensor, Tensor]:
        """The exact per-sequence NLL (B,) repeated K times (no noise: every draw is the same) and counts (B,)."""
        logits = self.backbone(tokens)[:, :-1]  # (B, L-1, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        B, L1 = tokens.shape[0], tokens.shape[1] - 1
        nll = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(B, L1)
        nll = nll.masked_fill(~valid[:, 1:], 0.0).sum(dim=-1, dtype=wide_float(tokens.device))  # (B,)
        return nll[:, None].repeat(1, samples), valid[:, 1:].sum(dim=-1).to(wide_float(tokens.device))


def build_ar(
    model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int, **special_ids: Any
) -> AR:
    """Registry builder. Reads ``bos_id`` from special_ids; diffusion_cfg and time_conditioning are unused."""
    d = model_cfg.dims()
    backbone = Backbone(
        vocab_in=vocab_size,
        vocab_out=vocab_size,
        d_model=d["d_model"],
        n_layers=d["n_layers"],
        n_heads=d["n_heads"],
        cond_dim=d["cond_dim"],
        dropout=model_cfg.dropout,
        causal=True,
    )
    return AR(backbone, vocab_size, bos_id=special_ids.get("bos_id"))


register_family(
    FamilySpec(
        name="ar",
        build=build_ar,
        schedules=(),
        description="Autoregressive baseline: same backbone, causal attention, exact next-token NLL.",
        reads=frozenset(),  # no noise process: every diffusion.* field and time conditioning are ignored
    )
)
