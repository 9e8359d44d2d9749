"""Validation diagnostics of diffusion_lm: the journal's failure modes as numbers, text and warnings.

On one clean val batch, each sequence is noised at a few fixed steps (noise buckets: t = 0 and
25%, 75%, 85% of T; the name ``tNNN`` is the percentage) and denoised in one step (x0-prediction,
no sampling chain). Per bucket, logged as ``val/<name>``:

* ``x0_cos/tNNN``: mean cosine similarity of x0_hat with the true word embedding EMB(w).
  The journal's working model reached ~0.96 at low t.
* ``x0_norm_ratio/tNNN``: mean ||x0_hat|| / mean ||EMB(w)||. Well below 1 is the
  magnitude under-prediction failure (x0_hat shrinks towards the mean embedding).
* ``x0_acc/tNNN``: share of tokens recovered by rounding x0_hat (tied decoder argmax).
* ``input_dependence/tNNN``: how distinct the reconstructions of different sequences are,
  relative to how distinct the inputs are: mean pairwise distance between sequences
  (position-wise L2) over the set's RMS norm, reconstructions divided by inputs. 1: as distinct
  as the inputs; 0: every input gets the same output (the journal's collapse to one generic
  sentence). Scale-free, so magnitude under-prediction alone does not lower it.

Plus ``embed_norm`` (mean ||EMB(w)|| over the batch: shrinking embeddings are the other way the
MSE can cheat) and ``round_clean_acc`` (rounding the clean embeddings: below 1 means the
embeddings are not separable by the tied decoder).

Text ``diagnostics/denoising``: for the first sequences, the original and the rounded
reconstruction from every bucket, as the journal printed them. A warning when the
reconstructions from t = 0 stop depending on the inputs (``input_dependence/t000`` below
:data:`COLLAPSE_THRESHOLD`), unless the predictions are still ~0 (an untrained, zero-initialised
output layer: visible in ``x0_norm_ratio`` instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from difflm.types import Diagnostics

if TYPE_CHECKING:
    from difflm.families.diffusion_lm.model import DiffusionLM

#: noise buckets as fractions of T (t = round(frac * (T - 1)))
BUCKETS: tuple[float, ...] = (0.0, 0.25, 0.75, 0.85)
#: input_dependence at t = 0 below this triggers the collapse warning
COLLAPSE_THRESHOLD = 0.3
#: sequences shown in the denoising demo, and characters shown per text
DEMO_ROWS, DEMO_CHARS = 2, 160


def bucket_name(frac: float) -> str:
    return f"t{round(frac * 100):03d}"


def bucket_steps(T: int) -> list[int]:
    """The integer step of each bucket."""
    return [round(frac * (T - 1)) for frac in BUCKETS]


def input_dependence(recon: Tensor, inputs: Tensor, eps: float = 1e-8) -> float:
    """Distinctness of reconstructions (B, L, E) relative to their inputs (B, L, E); nan when B < 2.

    distinct(S) = mean over pairs i != j of mean_l ||S_i,l - S_j,l||, divided by S's RMS vector norm."""
    B = recon.shape[0]
    if B < 2:
        return float("nan")

    def distinct(s: Tensor) -> Tensor:
        flat = s.double().transpose(0, 1)  # (L, B, E)
        pair = torch.cdist(flat, flat).mean(0)  # (B, B), mean over positions
        mean_pair = pair.sum() / (B * (B - 1))  # diagonal is 0
        rms = s.double().pow(2).sum(-1).mean().sqrt()
        return mean_pair / (rms + eps)

    return float(distinct(recon) / distinct(inputs).clamp(min=eps))


def _clip(text: str) -> str:
    return repr(text if len(text) <= DEMO_CHARS else text[:DEMO_CHARS] + "...")


@torch.no_grad()
def diffusion_lm_diagnostics(
    model: DiffusionLM, tokens: Tensor, generator: torch.Generator | None, decode: Callable[[list[int]], str]
) -> Diagnostics:
    """See the module docstring. tokens: one clean val batch (B, L); every position counts as real."""
    B, L = tokens.shape
    K = len(BUCKETS)
    steps = bucket_steps(model.T)
    t = torch.tensor(steps, device=tokens.device).repeat_interleave(B)  # (K*B,)
    rep = tokens.repeat(K, 1)  # (K*B, L), bucket-major
    terms = model.terms(rep, torch.ones_like(rep, dtype=torch.bool), t, generator)
    emb = terms.emb.view(K, B, L, -1)  # (K, B, L, E); the same EMB in every bucket
    x0_hat = terms.x0_hat.view(K, B, L, -1)  # (K, B, L, E)
    rounded = model.round(x0_hat)  # (K, B, L)

    cos = F.cosine_similarity(x0_hat, emb, dim=-1).mean(dim=(1, 2))  # (K,)
    emb_norm = emb[0].norm(dim=-1).mean()
    ratio = x0_hat.norm(dim=-1).mean(dim=(1, 2)) / emb_norm.clamp(min=1e-12)  # (K,)
    acc = (rounded == tokens[None]).float().mean(dim=(1, 2))  # (K,)
    scalars: dict[str, float] = {}
    for k, frac in enumerate(BUCKETS):
        name = bucket_name(frac)
        scalars[f"x0_cos/{name}"] = float(cos[k])
        scalars[f"x0_norm_ratio/{name}"] = float(ratio[k])
        scalars[f"x0_acc/{name}"] = float(acc[k])
        scalars[f"input_dependence/{name}"] = input_dependence(x0_hat[k], emb[k])
    scalars["embed_norm"] = float(emb_norm)
    scalars["round_clean_acc"] = float((model.round(emb[0]) == tokens).float().mean())

    lines: list[str] = []
    for b in range(min(DEMO_ROWS, B)):
        lines.append(f"**sequence {b}**  ")
        lines.append(f"original: {_clip(decode(tokens[b].tolist()))}  ")
        for k, frac in enumerate(BUCKETS):
            lines.append(f"t={steps[k]} ({frac:.0%} of T): {_clip(decode(rounded[k, b].tolist()))}  ")
        lines.append("")
    texts = {"denoising": "\n".join(lines)}

    warnings: list[str] = []
    dep0 = scalars[f"input_dependence/{bucket_name(BUCKETS[0])}"]
    ratio0 = scalars[f"x0_norm_ratio/{bucket_name(BUCKETS[0])}"]
    if dep0 == dep0 and dep0 < COLLAPSE_THRESHOLD and ratio0 > 0.05:  # dep0 == dep0: not nan
        warnings.append(
            f"diffusion_lm: reconstructions from t=0 barely depend on their inputs (input_dependence {dep0:.2f}; "
            "1 = as distinct as the inputs): the outputs are collapsing to one generic sequence. Check that the "
            "embedding target applies at t=0 only and that diffusion.likelihood_weight > 0."
        )
    return Diagnostics(scalars=scalars, texts=texts, warnings=warnings)
