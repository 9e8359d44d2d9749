"""The interface every model family implements, so the trainer never branches on the family.

A family is an ``nn.Module`` whose ``forward`` takes a batch of clean token ids and
returns a :class:`LossOutput` (the scalar to backpropagate, averaged over the counted
tokens), and whose :meth:`Family.val_nll` scores val sequences with the shared val noise
of :mod:`difflm.evaluation` (K draws per sequence, common random numbers). Both see the
same ``valid`` / ``counted`` positions: :func:`difflm.evaluation.counted_positions`.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difflm.families.registry import get_family
from difflm.types import (  # re-exported: families import their shared types from here or from difflm.types
    DenoiseResult,
    Diagnostics,
    LossOutput,
    SampleOptions,
    Sampler,
    SamplingError,
    ValNoise,
)

if TYPE_CHECKING:
    from difflm.families.config import DiffusionConfig

__all__ = ["Family", "LossOutput", "Diagnostics", "DenoiseResult", "ValNoise", "wide_float", "masked_denoise_metrics"]


def wide_float(device: torch.device) -> torch.dtype:
    """float64 for sums that must not lose tokens to rounding; float32 on MPS, which has no float64.

    Per batch a float32 sum of a few thousand terms is exact to ~1e-6 relative; the runner
    accumulates across batches in float64 on the CPU when the device is MPS.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def masked_denoise_metrics(recon: Tensor, tokens: Tensor, valid: Tensor, noised: Tensor) -> dict[str, float]:
    """The metrics of a denoise that corrupts a subset of positions (mdlm, sedd): ``mask_rate`` (noised share of
    the valid tokens), ``accuracy`` (reconstructed == clean over valid tokens) and ``masked_accuracy`` (over the
    noised ones; nan when none was noised). One helper so every masked family reports the same numbers."""
    n_valid = valid.sum().clamp(min=1)
    n_noised = noised.sum()
    correct = recon == tokens
    return {
        "mask_rate": float(n_noised / n_valid),
        "accuracy": float((correct & valid).sum() / n_valid),
        "masked_accuracy": float((correct & noised).sum() / n_noised) if int(n_noised) else float("nan"),
    }


class Family(nn.Module, ABC):
    """Base class of model families (mdlm, ar, ...): the network, its loss and its val estimator.

    Everything else a family offers is registered, not overridden: samplers (and the default one) in
    its ``FamilySpec``, from which :meth:`samplers` / :meth:`sample` are derived here. ``denoise`` and
    ``diagnostics`` are optional hooks (:class:`difflm.types.Denoiser`, :class:`difflm.types.Diagnoser`):
    a family defines the method or not, and callers check with ``isinstance``."""

    #: registry name, set by subclasses
    name: str = ""
    #: True when ``forward``'s ``nll_sum`` is an exact NLL (ar), False for a bound (diffusion families)
    exact_likelihood: bool = False

    @abstractmethod
    def forward(self, tokens: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """Loss on clean tokens (B, L) with a bool mask (B, L) of the positions that count.

        The trainer passes :func:`difflm.evaluation.counted_positions` (never BOS, never the
        packer's block-final EOS), so every family averages over the same tokens. All noise
        (times, masks) is drawn on ``tokens.device`` from ``generator`` when given.
        """

    # ---- training stages --------------------------------------------------------------------------

    def configure(self, diffusion: DiffusionConfig) -> None:
        """Apply a training stage's switches: the ``diffusion`` fields this family lists in
        ``FamilySpec.switches`` (spec validation lets a stage change only those). None by default."""

    def set_progress(self, fraction: float) -> None:
        """Share of the current training stage's steps done, in [0, 1], set before every train step
        (for curricula, e.g. mdlm's ATAT). Ignored by default."""

    # ---- sampling: derived from the registry entry, never written per family ----------------------

    def samplers(self) -> dict[str, Sampler]:
        """This family's samplers (``FamilySpec.samplers``) bound to this model, the default first; each is
        ``sampler(options, generator) -> SampleOutput``. Empty when the family registers none."""
        spec = get_family(self.name)
        if not spec.samplers:
            return {}
        default = spec.default_for(self)
        order = [default, *(n for n in spec.samplers if n != default)]
        return {n: functools.partial(spec.samplers[n], self) for n in order}

    @property
    def default_sampler(self) -> str:
        """The name ``difflm sample`` uses when none is given (``FamilySpec.default_sampler``)."""
        return get_family(self.name).default_for(self)

    @torch.no_grad()
    def sample(self, num: int, length: int, steps: int, generator: torch.Generator | None = None) -> Tensor:
        """``num`` unconditional samples of ``length`` token ids (num, length) in ``steps`` steps: the default
        sampler with default options (what training logs as sample texts)."""
        from difflm.sampling.core import get_sampler  # the draw-dtype wrapper every sampler call goes through

        if not get_family(self.name).samplers:
            raise SamplingError(f"family {self.name!r} registers no samplers (FamilySpec.samplers)")
        options = SampleOptions(num=num, length=length, steps=steps)
        return get_sampler(self, self.default_sampler)(options, generator).tokens

    def val_nll(self, tokens: Tensor, counted: Tensor, noise: ValNoise) -> Tensor:
        """Validation: K draws of the NLL (bound) per sequence, in common random numbers.

        tokens  (B, L) clean ids (packed val blocks).
        counted (B, L) bool, the positions that count (:func:`difflm.evaluation.counted_positions`):
                only they are noised and scored; the others stay clean context.
        noise   :class:`difflm.evaluation.ValNoise` of these B sequences: K masking rates (B, K)
                importance-sampled over (0, 1], per-position uniforms (B, K, L) and per-sequence
                seeds (B,). Use only this noise (never a generator of your own), so that a
                sequence's val noise depends on (eval_seed, its index) alone.
        Returns (B, K) sums over counted positions in nats, float64 (float32 on MPS: see
        :func:`wide_float`); column k must be an unbiased estimate of the sequence's NLL (bound)
        on its own. Called under ``torch.no_grad`` in eval mode by :func:`difflm.evaluation.val_pass`.
        For discrete diffusion, integrate over the masking rate m (``noise.masked(k, counted)``,
        weight ``noise.weights[:, k] * w(m)``, the importance weight over (0, 1]) and map m to the model's conditioning without the schedule
        (e.g. sigma = -log(1 - m)), so the schedule enters only through the trained weights."""
        raise NotImplementedError(
            f"family {self.name!r} does not implement val_nll(tokens, counted, noise) -> (B, K) float64 "
            "per-sequence NLL sums; validation and `difflm eval` need it (see Family.val_nll)"
        )

    def num_parameters(self) -> int:
        """Trainable parameters (printed at start)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
