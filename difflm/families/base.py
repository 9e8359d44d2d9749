"""The interface every model family implements, so the trainer never branches on the family.

A family is an ``nn.Module`` whose ``forward`` takes a batch of clean token ids and
returns a :class:`LossOutput`: the scalar to backpropagate plus the float64
per-token NLL sum that validation accumulates. Training and validation call the
same ``forward``; validation passes a seeded generator so its noise is fixed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class LossOutput:
    """What one forward pass of a family returns.

    loss:       scalar, mean over real tokens; what ``backward`` sees.
    nll_sum:    float64 scalar, sum over real tokens of the per-token NLL (bound) in nats;
                validation sums it over the whole val set and divides by ``num_tokens``.
    num_tokens: int64 scalar, how many real tokens ``nll_sum`` covers.
    metrics:    extra scalar tensors for logging (e.g. ``nelbo``, ``ce``); detached.
    """

    loss: Tensor
    nll_sum: Tensor
    num_tokens: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Diagnostics:
    """Family-specific validation extras, computed on one val batch at each eval.

    scalars:  logged under ``val/<name>`` (e.g. per-noise-bucket cosine similarity).
    texts:    logged as TensorBoard text under ``diagnostics/<name>`` (e.g. a denoising demo).
    warnings: plain-language lines shown on the console (e.g. outputs stopped depending on inputs).
    """

    scalars: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Family(nn.Module, ABC):
    """Base class of model families (mdlm, ar, ...)."""

    #: registry name, set by subclasses
    name: str = ""

    @abstractmethod
    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """Loss on clean tokens (B, L) with a bool mask of real tokens (B, L).

        All noise (times, masks) is drawn on ``tokens.device`` from ``generator`` when given.
        """

    @abstractmethod
    @torch.no_grad()
    def sample(
        self, num: int, length: int, steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``num`` unconditional samples of ``length`` token ids (num, length) in ``steps`` steps."""

    @torch.no_grad()
    def diagnostics(
        self, tokens: Tensor, generator: torch.Generator | None, decode: Callable[[list[int]], str]
    ) -> Diagnostics:
        """Extra validation metrics on one clean val batch (B, L); none by default.

        Called on every rank (collectives under ZeRO-3 must match); only rank 0 logs the result.
        """
        return Diagnostics()

    def num_parameters(self) -> int:
        """Trainable parameters (printed at start)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
