"""Generative perplexity and unigram entropy of samples: the maths, with no model loading.

Protocol (docs/evaluation.md):

* **Which tokens count.** A sample is cut at its first EOS (:func:`cut_at_eos`; the EOS itself
  is dropped, as the text ends there) and a leading BOS is dropped. Both metrics use the same
  tokens, so a sampler that emits EOS early cannot flatter one and not the other.
* **Gen-PPL** = ``exp(sum of judge NLL / sum of judge tokens)`` over all samples (the token-weighted
  mean, as MDLM / DUO compute it). Its standard error comes from the per-sample sums by the
  delta method for a ratio estimator (:func:`ratio_mean_se`), so long samples weigh more, as in
  the point estimate.
* **Unigram entropy** of one sample: ``-sum_v f_v log f_v`` in nats over the frequencies f of its
  token ids (:func:`unigram_entropy`); reported as the mean over samples with its standard error.
  A low gen-PPL at a low entropy is repetition, not quality.
* **Windows.** A judge scores a sequence longer than its context in windows
  (:func:`judge_windows`): every token is scored exactly once, each window re-reads up to half a
  context of the previous tokens as conditioning, never a silent truncation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def cut_at_eos(ids: Sequence[int], eos_id: int | None, bos_id: int | None = None) -> list[int]:
    """``ids`` without a leading BOS, up to (not including) the first EOS."""
    out = list(ids)
    if bos_id is not None and out and out[0] == bos_id:
        out = out[1:]
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id)]
    return out


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in nats of the empirical distribution of ``ids`` (0 for an empty or constant sequence)."""
    n = len(ids)
    if n == 0:
        return 0.0
    counts = np.fromiter(Counter(ids).values(), dtype=np.float64)
    p = counts / n
    return float(-(p * np.log(p)).sum())


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); SE is nan for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se


def ratio_mean_se(sums: Sequence[float], counts: Sequence[float]) -> tuple[float, float]:
    """``sum(sums) / sum(counts)`` and its delta-method standard error over the (sum, count) pairs.

    The per-pair residual is ``sums_i - r * counts_i``; SE = sqrt(n / (n - 1) * sum(res^2)) / sum(counts)."""
    s = np.asarray(sums, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return math.nan, math.nan
    r = float(s.sum() / total)
    n = s.size
    if n < 2:
        return r, math.nan
    res = s - r * c
    return r, float(math.sqrt(n / (n - 1) * (res**2).sum()) / total)


def judge_windows(n: int, context: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, first_scored)`` that score positions 1..n-1 of an n-token sequence once each.

    Position 0 (BOS, or the first token when the judge has none) is never a target. A window reads
    ``ids[start:end]`` (at most ``context`` tokens) and scores positions ``first_scored..end-1``; after
    the first window each one keeps ``context // 2`` earlier tokens as conditioning."""
    if context < 2:
        raise ValueError(f"a judge context of {context} tokens cannot score anything; it needs at least 2")
    if n < 2:
        return []
    return [(start, end, first) for start, first, end in covering_windows(n, context, first=1)]


def covering_windows(n: int, width: int, first: int = 0) -> list[tuple[int, int, int]]:
    """Windows ``(start, first_scored, end)`` of at most ``width`` tokens that score positions ``first..n-1``
    exactly once: window ``ids[start:end]`` scores ``ids[first_scored:end]`` given ``ids[start:first_scored]``;
    after the first window each keeps ``width // 2`` earlier tokens as context. The judge's windows
    (:func:`judge_windows`) and lm-eval's rolling log-likelihood (``difflm.metrics.loglik``) share it."""
    out: list[tuple[int, int, int]] = []
    keep = width // 2
    while first < n:
        start = max(0, first - keep) if out else 0
        end = min(n, start + width)
        out.append((start, first, end))
        first = end
    return out


@dataclass
class GenPPL:
    """Gen-PPL, entropy and their standard errors over samples (see the module docstring)."""

    nll: float  # nats per judge token
    nll_se: float
    entropy: float  # mean unigram entropy of the samples' ids, nats
    entropy_se: float
    num_samples: int
    judge_tokens: float
    sample_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 700.0))

    @property
    def ppl_se(self) -> float:
        """Delta method: d exp(x) = exp(x) dx."""
        return self.ppl * self.nll_se

    def scalars(self) -> dict[str, float]:
        return {"gen_ppl": self.ppl, "gen_ppl_se": self.ppl_se, "gen_nll": self.nll, "gen_nll_se": self.nll_se,
                "entropy": self.entropy, "entropy_se": self.entropy_se, "num_samples": float(self.num_samples),
                "judge_tokens": self.judge_tokens, "sample_tokens": float(self.sample_tokens)}


def gen_ppl(judge_sums: Sequence[float], judge_counts: Sequence[float], sample_ids: Sequence[Sequence[int]]) -> GenPPL:
    """Combine the judge's per-sample NLL sums and token counts with each sample's ids (already cut at EOS)."""
    if not (len(judge_sums) == len(judge_counts) == len(sample_ids)):
        raise ValueError("judge_sums, judge_counts and sample_ids must have one entry per sample")
    nll, nll_se = ratio_mean_se(judge_sums, judge_counts)
    ent, ent_se = mean_se([unigram_entropy(s) for s in sample_ids])
    return GenPPL(nll=nll, nll_se=nll_se, entropy=ent, entropy_se=ent_se, num_samples=len(sample_ids),
                  judge_tokens=float(np.sum(judge_counts)), sample_tokens=sum(len(s) for s in sample_ids))
