"""The shared validation contract: which tokens count, and the val noise as common random numbers.

Every family's ``val/nll`` is computed through this module so that trials of a sweep
compare on one scale:

* **Which tokens count** (:func:`counted_positions`): packed blocks are
  ``[BOS] tokens... [EOS]`` (``difflm.data.pipeline.pack_blocks``). Position 0 (BOS) is
  never a target, and the block-final EOS is added by the packer, not a document end, so
  it does not count either. EOS tokens *inside* a block are real document ends and count.
  Training normalises its loss by the same positions, so every family (ar, mdlm, ...)
  averages over the same ``L - 2`` tokens per block.
* **Common random numbers** (:func:`make_val_noise`): the noise of val sequence ``i``
  (its K masking rates and the per-position uniforms that decide its masks) is a function
  of ``(eval_seed, i)`` only: not of the schedule, the batch size, the worker count or the
  batch order. Two trials with identical weights therefore read identical val NLL, and the
  difference between two trials has a small *paired* standard error.
* **Masking-rate space**: rates are stratified over one fixed range
  ``[RATE_MIN, RATE_MAX]`` for every schedule; a family integrates its bound over the
  masking rate ``m`` (density ``1 / (RATE_MAX - RATE_MIN)``), so the schedule enters the val
  metric only through the model it trained.

Plain PyTorch + numpy; no Ray or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: The common masking-rate range of the val estimator (the loglinear schedule's range at eps = 1e-3).
RATE_MIN: float = 1e-3
RATE_MAX: float = 1.0 - 1e-3


def counted_positions(tokens: Tensor) -> Tensor:
    """(B, L) bool: the positions whose tokens count as targets (every family, training and val).

    Excludes position 0 (BOS) and position L-1 (the packer's block-final EOS); see the module docstring.
    """
    counted = torch.ones_like(tokens, dtype=torch.bool)  # (B, L)
    counted[:, 0] = False
    counted[:, -1] = False
    return counted


@dataclass(frozen=True)
class ValNoise:
    """The val noise of a batch of sequences, K draws each, as common random numbers.

    rates:    (B, K) masking rates in [rate_min, rate_max], stratified per sequence: draw k lies in
              the k-th of K equal strata of the range (one uniform offset per sequence).
    uniforms: (B, K, L) U[0, 1) per position; in draw k, position j is masked iff
              ``uniforms[b, k, j] < rates[b, k]`` (and it is a counted position).
    seeds:    (B,) int64 per-sequence seeds for families that need other noise (e.g. Gaussian),
              also functions of (eval_seed, sequence index) only.
    rate_min, rate_max: the range; a family's estimate of an integral over the rate m is
              ``(rate_max - rate_min) * integrand(m_k)`` averaged over k.
    """

    rates: Tensor
    uniforms: Tensor
    seeds: Tensor
    rate_min: float = RATE_MIN
    rate_max: float = RATE_MAX

    @property
    def samples(self) -> int:
        return int(self.rates.shape[1])

    @property
    def span(self) -> float:
        return self.rate_max - self.rate_min

    def masked(self, k: int, counted: Tensor) -> Tensor:
        """(B, L) bool: the positions masked in draw k (only counted positions are ever masked)."""
        return (self.uniforms[:, k] < self.rates[:, k, None]) & counted


def _sequence_seed(seed: int, index: int) -> tuple[int, int]:
    """Two 63-bit seeds from (seed, index): one for the torch draws, one handed to families."""
    a, b = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, np.uint64)
    return int(a) & 0x7FFF_FFFF_FFFF_FFFF, int(b) & 0x7FFF_FFFF_FFFF_FFFF


def make_val_noise(
    indices: Tensor | np.ndarray | list[int],
    samples: int,
    length: int,
    seed: int,
    device: torch.device | str = "cpu",
    *,
    rate_min: float = RATE_MIN,
    rate_max: float = RATE_MAX,
) -> ValNoise:
    """The val noise of the sequences with val-split ``indices`` (B,), K = ``samples`` draws of ``length``.

    Drawn on the CPU from one generator per sequence seeded by (seed, index), then moved to
    ``device``: the same numbers on every device, batch size and worker count.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0.0 < rate_min < rate_max <= 1.0:
        raise ValueError(f"need 0 < rate_min < rate_max <= 1, got {rate_min}, {rate_max}")
    idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
    B = len(idx)
    rates = torch.empty(B, samples, dtype=torch.float64)  # (B, K)
    uniforms = torch.empty(B, samples, length, dtype=torch.float32)  # (B, K, L)
    seeds = torch.empty(B, dtype=torch.int64)  # (B,)
    strata = torch.arange(samples, dtype=torch.float64)  # (K,)
    gen = torch.Generator(device="cpu")
    for b, i in enumerate(idx):
        draw_seed, family_seed = _sequence_seed(seed, i)
        gen.manual_seed(draw_seed)
        offset = torch.rand(1, generator=gen, dtype=torch.float64)  # (1,)
        rates[b] = rate_min + (rate_max - rate_min) * (strata + offset) / samples
        uniforms[b] = torch.rand(samples, length, generator=gen, dtype=torch.float32)
        seeds[b] = family_seed
    device = torch.device(device)
    return ValNoise(
        rates=rates.to(device),
        uniforms=uniforms.to(device),
        seeds=seeds.to(device),
        rate_min=rate_min,
        rate_max=rate_max,
    )
