"""Log-likelihood of a continuation given a context, for any family: exact for ar, a Monte Carlo bound otherwise.

The sequence is ``[BOS] + context + continuation`` (no padding, at most the model's trained length).
Only the continuation's positions are *counted* (:meth:`Family.val_nll`'s contract): a diffusion
family masks only them, with K masking rates stratified over the common range and the context left
clean, and returns one unbiased draw of the NELBO of the continuation per rate, the estimator
dllm / LLaDA use for multiple-choice tasks (masked tokens' -log p weighted by 1/rate). ar returns
the exact sum of -log p(continuation token | everything before). The result is minus the mean of
the K draws with the draws' standard error (0 for an exact family).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difflm.evaluation import make_val_noise
from difflm.metrics.genppl import covering_windows
from difflm.families.base import Family


class TooLongError(ValueError):
    """A request that does not fit the model's trained length (the message names both lengths)."""


@dataclass(frozen=True)
class ContinuationScore:
    """log p(continuation | context) (a lower bound for diffusion families) and its Monte Carlo SE."""

    logprob: float
    se: float
    draws: tuple[float, ...]
    tokens: int


def build_sequence(context: list[int], continuation: list[int], bos_id: int | None, max_len: int) -> list[int]:
    """``[BOS] + context + continuation``; :class:`TooLongError` naming the lengths when over ``max_len``."""
    seq = ([bos_id] if bos_id is not None else []) + list(context) + list(continuation)
    if len(seq) > max_len:
        raise TooLongError(
            f"request of {len(seq)} tokens (BOS + {len(context)} context + {len(continuation)} continuation) is "
            f"longer than the model's seq_len {max_len}; shorten the task's context (fewer few-shot examples) "
            "or use a model trained on longer sequences"
        )
    if not continuation:
        raise ValueError("the continuation is empty; there is nothing to score")
    return seq


@torch.no_grad()
def continuation_logprob(model: Family, context: list[int], continuation: list[int], *, bos_id: int | None,
                         max_len: int, samples: int, seed: int = 0, index: int = 0) -> ContinuationScore:
    """log p(continuation | context) by ``model.val_nll`` with only the continuation counted (see module doc).

    ``seed`` and ``index`` fix the noise (common random numbers: the same request gets the same
    masks whatever the batch, so answer options of one question are compared on the same noise rates)."""
    seq = build_sequence(context, continuation, bos_id, max_len)
    dev = model.device
    tokens = torch.tensor([seq], device=dev)  # (1, L)
    counted = torch.zeros_like(tokens, dtype=torch.bool)
    counted[0, len(seq) - len(continuation):] = True
    noise = make_val_noise([index], samples, len(seq), seed, dev)
    draws = model.val_nll(tokens, counted, noise)[0].double().cpu()  # (K,) NLL sums
    k = draws.numel()
    se = float(draws.std(unbiased=True) / math.sqrt(k)) if k > 1 else (0.0 if model.exact_likelihood else math.nan)
    return ContinuationScore(logprob=-float(draws.mean()), se=se, draws=tuple(float(-d) for d in draws),
                             tokens=len(continuation))


def rolling_windows(n: int, max_len: int) -> list[tuple[int, int, int]]:
    """``(start, first, end)`` chunks for a rolling log-likelihood of n tokens: chunk ``ids[start:end]``
    (plus BOS: at most ``max_len`` positions) scores ``ids[first:end]`` given ``ids[start:first]``.
    Every token is scored exactly once; after the first chunk each keeps half a window of context."""
    width = max_len - 1
    if width < 2:
        raise TooLongError(f"seq_len {max_len} is too short for a rolling log-likelihood")
    return covering_windows(n, width)
