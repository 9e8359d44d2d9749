"""Sampling helpers shared by the families' samplers."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_categorical(log_probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of (..., V) log-probabilities -> (...) int64, by Gumbel-max.

    The Gumbel noise is float64 (float32 on MPS, which has no float64): in float32 its
    tail is truncated, which silently lowers the sampling temperature and the sample
    diversity of masked diffusion models (Zheng et al., 2024). -inf entries are never drawn.
    """
    dtype = torch.float32 if log_probs.device.type == "mps" else torch.float64
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=dtype)  # (..., V)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))  # (..., V)
    return (log_probs.to(dtype) + gumbel).argmax(dim=-1)  # (...)
