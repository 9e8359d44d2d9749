"""ATAT for MDLM: an importance estimator, importance-biased (adaptive) masking and an easy -> hard curriculum.

The pieces, all pure tensor maths except the head (docs/atat.md has the why and the numbers):

* :class:`ImportanceHead`: a small transformer (the journal: 256 wide, 2 layers, 4 heads, ~2M
  parameters at a 768-wide backbone) reading the backbone's final hidden states of a uniformly
  masked probe x_t' (``importance_from: noisy``) or of the clean sequence (``clean``, the journal's)
  and predicting, per token, a logit whose sigmoid is the importance s in [0, 1].
* :func:`importance_target`: what s is trained towards: ``1 - p(x0 | x)`` at the masked positions
  (x the probe, or the final x_t for clean), detached, i.e. the probability that the denoiser gets
  that token wrong. It is in [0, 1] by construction, so the head trains with binary cross-entropy
  (logged as the KL to the targets, :func:`head_loss`: 0 for a perfect estimator).
* :func:`adaptive_mask_probs`: per-token masking probabilities biased by importance rank, whose
  mean over each sequence's candidates is exactly the plain rate (a per-sequence logit shift found
  by bisection): the schedule still sets *how many* tokens are masked, ATAT only *which*. noisy:
  the candidates are the probe's masks, so every token the head saw stays visible.
* :func:`unbiased_weights`: importance-sampling weights plain rate / p_i that give every token the
  plain expected loss weight (``unbiased: true``).
* :func:`curriculum_phase`: easy -> medium -> hard by the fraction of the stage's steps done
  (a function of the step, so a resumed run is in the right phase without extra state).

Only MDLM's *training* forward uses this; validation, ``difflm eval`` and sampling never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.families.config import AtatConfig

Focus = Literal["easy", "medium", "hard"]

#: curriculum phases in order; TensorBoard's ``train/curriculum_phase`` is the index
PHASES: tuple[Focus, ...] = ("easy", "medium", "hard")

#: which importance-rank quantile each focus favours (0 = the sequence's easiest token, 1 = its hardest)
FOCUS_CENTRE: dict[str, float] = {"easy": 0.0, "medium": 0.5, "hard": 1.0}

#: factor on the head's loss in the training loss. Adam(W) normalises each parameter's steps by its own
#: gradient scale, so the head learns the same with or without it; but the trainer clips the *global*
#: gradient norm (train.grad_clip, DeepSpeed's too), and the head's raw gradient (norm ~13 at init at size
#: tiny, against the backbone's ~0.5) made that clip shrink the backbone's gradient ~25x from the stage
#: that switches the head on, with AdamW's second moments from the plain stage then cutting its steps
#: for ~1/(1 - beta2) steps: every ATAT arm was ~0.1 nats/token worse than staged plain (docs/atat.md).
HEAD_GRAD_SCALE = 1e-3

#: bisection steps of the rate-preserving shift: the shift lies in [0, strength], so the error is strength / 2^40
_BISECT_STEPS = 40


@dataclass
class AtatMasks:
    """What :meth:`MDLM.atat_masking` decides before the training forward (all (B, L)).

    ``probs`` None means plain masking; ``target``/``where`` are the head's training target and positions
    when the importance came from a noisy probe (None: clean, the final mask's own CE is the target)."""

    head_logits: Tensor  # with grad into the head only
    importance: Tensor  # sigmoid of the detached logits, float32
    probs: Tensor | None  # per-token masking probabilities, 0 where a token cannot be masked
    rate: Tensor  # (B,) the mean of probs over the candidates: plain masking's probability there
    target: Tensor | None
    where: Tensor | None
    focus: Focus


class ImportanceHead(nn.Module):
    """Hidden states (B, L, in_dim) -> importance logits (B, L); sigmoid gives the importance in [0, 1].

    Pre-norm ``nn.TransformerEncoder`` layers (no positions of its own: the backbone's rotary
    attention already put position and context into every hidden state)."""

    def __init__(self, in_dim: int, width: int = 256, layers: int = 2, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        h = self.encoder(self.proj(hidden))  # (B, L, W)
        return self.out(self.norm(h)).squeeze(-1)  # (B, L)


def importance_target(ce: Tensor) -> Tensor:
    """Per-token training target of the head from the denoising cross-entropy (B, L): 1 - p(x0 | x_t), detached.

    In [0, 1]: 0 for a token the denoiser already gets right with certainty, 1 for one it cannot guess."""
    return -torch.expm1(-ce.detach().float())  # (B, L)


def head_loss(logits: Tensor, target: Tensor, where: Tensor) -> Tensor:
    """The head's loss: binary cross-entropy of importance logits (B, L) against soft targets (B, L) minus the
    targets' own entropy, i.e. KL(Bernoulli(target) || Bernoulli(sigmoid(logits))), mean over ``where`` (B, L).

    Same gradient as the BCE (the entropy is a constant), but 0 for a perfect estimator, so the logged
    ``importance_loss`` reads directly as "how far the head is from the targets" even while the targets
    move as the denoiser learns. Zero (with a graph) when nothing is selected, so it never makes nan."""
    y = target.clamp(1e-6, 1 - 1e-6)  # (B, L)
    entropy = -(y * y.log() + (1 - y) * (1 - y).log())  # (B, L)
    kl = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none") - entropy  # (B, L)
    kl = kl.masked_fill(~where, 0.0)
    return kl.sum() / where.sum().clamp(min=1)


def rank_quantiles(scores: Tensor, valid: Tensor) -> Tensor:
    """(B, L) scores -> (B, L) rank quantiles in [0, 1] among each sequence's valid tokens (0 = lowest score).

    Ranks, not raw scores, so the bias has the same size whatever the head's calibration; ties are
    broken by position (stable sort). Invalid positions get 0.5 (they are never masked anyway)."""
    s = scores.float().masked_fill(~valid, float("inf"))  # invalid sort last
    ranks = s.argsort(dim=-1, stable=True).argsort(dim=-1).to(torch.float32)  # (B, L) 0..L-1
    n = valid.sum(dim=-1, keepdim=True).to(torch.float32)  # (B, 1)
    q = ranks / (n - 1).clamp(min=1)  # (B, L)
    return torch.where(valid, q, torch.full_like(q, 0.5))


def focus_bias(quantiles: Tensor, focus: Focus, strength: float) -> Tensor:
    """Masking-logit bias (B, L) in [-strength, 0]: 0 at the focus's rank quantile, -strength farthest from it."""
    centre = FOCUS_CENTRE[focus]
    reach = max(centre, 1.0 - centre)  # the largest possible distance, so the bias spans the whole range
    return -strength * (quantiles - centre).abs() / reach  # (B, L)


def adaptive_mask_probs(move: Tensor, bias: Tensor, valid: Tensor, strength: float) -> Tensor:
    """Masking probabilities (B, L) = sigmoid(logit(move) + c + bias) with c per sequence such that their
    mean over the sequence's valid tokens is ``move`` (B,): the schedule's rate, exactly (to ~1e-7).

    ``bias`` must lie in [-strength, 0] (:func:`focus_bias`): then c = 0 gives a mean <= move and
    c = strength a mean >= move, and the mean grows with c, so bisection on [0, strength] finds it.
    Invalid positions get probability 0."""
    B = move.shape[0]
    m = move.clamp(1e-6, 1 - 1e-6).to(torch.float32)  # (B,) logit must stay finite
    base = torch.logit(m)[:, None] + bias.float()  # (B, L)
    vf = valid.to(torch.float32)  # (B, L)
    n = vf.sum(dim=-1).clamp(min=1)  # (B,)
    lo = torch.zeros(B, device=move.device)  # (B,)
    hi = torch.full((B,), float(strength), device=move.device)  # (B,)
    for _ in range(_BISECT_STEPS if strength > 0 else 0):
        mid = (lo + hi) / 2  # (B,)
        mean = (torch.sigmoid(base + mid[:, None]) * vf).sum(dim=-1) / n  # (B,)
        low = mean < m
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    probs = torch.sigmoid(base + ((lo + hi) / 2)[:, None])  # (B, L)
    return (probs * vf).to(move.dtype)  # (B, L)


def curriculum_phase(progress: float, bounds: tuple[float, float]) -> int:
    """0 easy, 1 medium, 2 hard for ``progress`` in [0, 1] (share of the stage's steps done) and the two bounds."""
    lo, hi = bounds
    return 0 if progress < lo else 1 if progress < hi else 2


def current_focus(cfg: AtatConfig, progress: float) -> Focus:
    """The adaptive-masking focus now: the curriculum's phase when it is on, else ``cfg.focus``."""
    return PHASES[curriculum_phase(progress, cfg.curriculum_bounds)] if cfg.curriculum else cfg.focus


def importance_weights(importance: Tensor, masked: Tensor, mix: float) -> Tensor:
    """Per-token loss weights (B, L): (1 - mix) + mix * s / mean(s over masked tokens); detached.

    Mean 1 over the masked tokens, so the loss keeps its scale and only its emphasis moves to the
    tokens the head calls hard."""
    s = importance.detach().float()  # (B, L)
    mean = (s * masked).sum() / masked.sum().clamp(min=1)
    return (1 - mix) + mix * s / mean.clamp(min=1e-6)  # (B, L)


def unbiased_weights(rate: Tensor, probs: Tensor, masked: Tensor, max_weight: float) -> Tensor:
    """Importance-sampling weights (B, L): ``rate / probs`` at the masked tokens, clipped at ``max_weight``; 0 elsewhere.

    ``probs`` (B, L) is each candidate token's adaptive masking probability given what it was computed
    from (the clean sequence, or the noisy probe), ``rate`` (B,) the probability plain masking gives every
    candidate there (clean: m = move_chance(t); noisy: m / m', the uniform thinning of the probe's masks,
    which makes plain Bernoulli(m) masks). A candidate is masked with probability p_i and then weighs
    rate / p_i, so its expected weight is the plain one whatever p_i is: in each token's masking marginal
    the biased masks become the plain ones. For a denoiser whose per-token loss does not depend on which
    *other* tokens are masked this makes the expected loss exactly the plain NELBO; for a contextual one
    the context is still drawn from the biased masks (the exact correction would be a product of L such
    ratios: unusable variance). Detached."""
    r = rate.detach().to(torch.float32)[:, None]  # (B, 1)
    p = probs.detach().to(torch.float32).clamp(min=1e-12)  # (B, L)
    return torch.where(masked, (r / p).clamp(max=max_weight), 0.0)  # (B, L)


def pearson(a: Tensor, b: Tensor, where: Tensor) -> Tensor:
    """Correlation of a and b (B, L) over the ``where`` positions; 0 when either is constant there."""
    w = where.to(torch.float32)
    n = w.sum().clamp(min=1)
    am = a.float() - (a.float() * w).sum() / n
    bm = b.float() - (b.float() * w).sum() / n
    cov = (am * bm * w).sum()
    den = ((am.square() * w).sum() * (bm.square() * w).sum()).sqrt()
    return torch.where(den > 0, cov / den.clamp(min=1e-12), torch.zeros_like(cov))
