"""BD3-LMs' clipped noise schedule: the candidate ranges, the variance search, and in-range mask resampling.

Why: with small blocks a block's NELBO estimate (weight 1/m times the masked tokens' cross-entropy) is
very noisy at extreme masking rates m: near 0 a block has no mask or one with a huge weight, near 1 it
is almost all masked. BD3-LMs (Arriola et al., ICLR 2025, section 4) therefore train with m uniform in a
clipped range [beta, omega] and pick the range from data ("var_min"): at every validation they compute
the training loss terms under each candidate range on val batches, and train on the range whose
per-block losses vary least. The val NELBO is not touched (it always integrates all of (0, 1]).

Here:

* :func:`candidate_ranges`: the full range [sampling_eps, 1], then for each width w the windows
  [max(i, sampling_eps), i + w], i = 0, delta, 2 delta, ... up to 1 - w (BD3-LMs' grid; block size 1
  compares the full range with [1, 1] only, where every token is masked: the exact AR NLL).
* :func:`block_moments` / :func:`summed_variances`: per candidate and val batch, the variance of the
  per-block mean loss over all blocks of the batch (of every worker: the moments n, sum, sum of squares
  are summed across workers before the variance), summed over batches; the argmin wins (ties: the
  earlier candidate, so the full range wins a tie). Unlike BD3-LMs, every candidate sees the same noise
  (common random numbers: the generator state is rewound per candidate), so the comparison is not
  blurred by noise that differs between candidates; and the per-block mean is over the block's counted
  tokens (BD3-LMs divide by the block size, counting the ignored BOS as 0).
* :func:`resample_block_masks`: BD3-LMs' ``training.resample`` redraws a block's masks until its masked
  share lies in [beta, omega]. The outcome of that rejection loop is the plain draw conditioned on the
  share being in range: the masked count is a Binomial(n, m) truncated to the allowed counts, and the
  masked positions are uniform given the count. This draws exactly that, with a fixed number of
  uniforms and no loop (so no host sync and no unbounded redraws when a range admits no count).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

Range = tuple[float, float]


def candidate_ranges(widths: Sequence[float], delta: float, sampling_eps: float, block_size: int) -> list[Range]:
    """The ranges a search compares, in order (the full range first); duplicates dropped.

    Window starts are k * delta for k = 0, 1, ... while k * delta <= 1 - w (to 1e-9: float steps such as
    0.05 must not lose the last window), rounded to 1e-9 so that 0.1 + 0.2 reads 0.3."""
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    full = (float(sampling_eps), 1.0)
    if block_size == 1:
        return [full, (1.0, 1.0)]
    out = [full]
    for w in widths:
        if not 0.0 < w <= 1.0:
            raise ValueError(f"clip widths must be in (0, 1], got {w}")
        for k in range(int(math.floor((1.0 - w) / delta + 1e-9)) + 1):
            start = round(k * delta, 9)
            cand = (max(start, float(sampling_eps)), min(round(start + w, 9), 1.0))
            if cand not in out:
                out.append(cand)
    return out


def block_moments(nelbo_tok: Tensor, counted: Tensor, block_size: int) -> Tensor:
    """(3,) float64 [n, sum, sum of squares] of the per-block mean loss over the blocks of a batch.

    nelbo_tok (B, L): per-token loss terms (0 where not masked); counted (B, L) bool. A block's mean is over
    its counted tokens; blocks without any (a block of only BOS) are left out."""
    B, L = nelbo_tok.shape
    nb = -(-L // block_size)
    pad = nb * block_size - L
    vals = torch.nn.functional.pad(nelbo_tok.to(torch.float64), (0, pad)).view(B, nb, block_size)
    cnt = torch.nn.functional.pad(counted, (0, pad)).view(B, nb, block_size).sum(-1)  # (B, nb)
    present = cnt > 0
    means = (vals.sum(-1) / cnt.clamp(min=1))[present]  # (n,)
    return torch.stack([present.sum().to(torch.float64), means.sum(), (means * means).sum()])


def summed_variances(moments: Tensor) -> Tensor:
    """(C,) sum over batches of the unbiased variance of per-block means, from moments (C, N, 3).

    A batch row with fewer than two blocks adds 0 (a padding batch of a worker with fewer val batches)."""
    n, s, q = moments.unbind(-1)  # (C, N) each
    var = (q - s * s / n.clamp(min=1)) / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.clamp(min=0), 0.0).sum(-1)


def search(
    terms: Callable[[Tensor, Tensor, torch.Generator, Range], Tensor],
    candidates: Sequence[Range],
    batches: Sequence[tuple[Tensor, Tensor]],
    block_size: int,
    generator: torch.Generator,
    all_reduce: Callable[[Tensor], Tensor],
) -> Tensor:
    """(C,) summed variances of every candidate (identical on every worker); ``terms(tokens, counted, gen, range)``
    returns the per-token training-loss terms (B, L) under that range. Every candidate of a batch starts from
    the same generator state (common random numbers); every worker runs len(candidates) * len(batches)
    forwards, whatever its data (ZeRO-3 gathers are collective)."""
    device = batches[0][0].device if batches else torch.device("cpu")
    moments = torch.zeros(len(candidates), len(batches), 3, dtype=torch.float64, device=device)
    for j, (tokens, counted) in enumerate(batches):
        state = generator.get_state()
        for c, rng in enumerate(candidates):
            generator.set_state(state)
            moments[c, j] = block_moments(terms(tokens, counted, generator, rng), counted, block_size)
    return summed_variances(all_reduce(moments))


def resample_block_masks(
    plain: Tensor, move: Tensor, valid: Tensor, block_size: int, clip: Range, lower: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """(B, L) bool masks whose masked share of each block's counted tokens lies in clip = [beta, omega].

    plain (B, L): the unconstrained draw (kept for a block where no masked count is in range, e.g. 4 tokens
    and [0.3, 0.45]); move (B, L): the per-token masking rate, constant over a block; valid (B, L) bool.
    ``lower`` False drops the lower bound (beta is sampling_eps: a block may stay unmasked, as in BD3-LMs).
    Draws (B, nb) + (B, nb, block_size) uniforms from ``generator`` whatever the data."""
    B, L = plain.shape
    nb = -(-L // block_size)
    pad = nb * block_size - L
    ok = torch.nn.functional.pad(valid, (0, pad)).view(B, nb, block_size)  # (B, nb, bs)
    n = ok.sum(-1).to(torch.float64)  # (B, nb) counted tokens per block
    p = torch.nn.functional.pad(move, (0, pad)).view(B, nb, block_size)[..., 0].to(torch.float64)  # (B, nb)
    k = torch.arange(block_size + 1, device=plain.device, dtype=torch.float64)  # (bs+1,)
    nk = n[..., None] - k  # (B, nb, bs+1)
    logpmf = (torch.lgamma(n[..., None] + 1) - torch.lgamma(k + 1) - torch.lgamma(nk.clamp(min=0) + 1)
              + torch.xlogy(k, p[..., None]) + torch.xlogy(nk.clamp(min=0), 1 - p[..., None]))
    lo, hi = clip
    allowed = (nk >= 0) & (k <= hi * n[..., None] + 1e-9)
    if lower:
        allowed &= k >= lo * n[..., None] - 1e-9
    logw = torch.where(allowed & (logpmf > -math.inf), logpmf, -math.inf)
    feasible = (logw > -math.inf).any(-1)  # (B, nb)
    probs = torch.softmax(torch.where(feasible[..., None], logw, 0.0), dim=-1)  # (B, nb, bs+1)
    u_count = torch.rand(B, nb, generator=generator, device=plain.device, dtype=torch.float64)
    last = torch.where(probs > 0, k, -1.0).amax(-1).clamp(min=0).long()  # (B, nb) largest drawable count
    count = torch.minimum((probs.cumsum(-1) < u_count[..., None]).sum(-1), last)  # (B, nb) inverse CDF
    u_pos = torch.rand(B, nb, block_size, generator=generator, device=plain.device, dtype=torch.float64)
    u_pos = torch.where(ok, u_pos, 2.0)  # positions that cannot be masked sort last
    kth = u_pos.sort(-1).values.gather(-1, (count - 1).clamp(min=0)[..., None])  # (B, nb, 1)
    drawn = (u_pos <= kth) & ok & (count > 0)[..., None]  # the `count` smallest uniforms of the block
    drawn = drawn.view(B, nb * block_size)[:, :L]
    return torch.where(feasible.repeat_interleave(block_size, dim=1)[:, :L], drawn, plain)
