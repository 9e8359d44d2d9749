"""The interface every model family implements, so the trainer never branches on the family.

A family is an ``nn.Module`` whose ``forward`` takes a batch of clean token ids and
returns a :class:`LossOutput` (the scalar to backpropagate, averaged over the counted
tokens), and whose :meth:`Family.val_nll` scores val sequences with the shared val noise
of :mod:`difflm.evaluation` (K draws per sequence, common random numbers). Both see the
same ``valid`` / ``counted`` positions: :func:`difflm.evaluation.counted_positions`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from difflm.evaluation import ValNoise
    from difflm.families.config import DiffusionConfig
    from difflm.sampling.core import SampleOptions, SampleOutput, Sampler


def wide_float(device: torch.device) -> torch.dtype:
    """float64 for sums that must not lose tokens to rounding; float32 on MPS, which has no float64.

    Per batch a float32 sum of a few thousand terms is exact to ~1e-6 relative; the runner
    accumulates across batches in float64 on the CPU when the device is MPS.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@dataclass
class LossOutput:
    """What one forward pass of a family returns.

    loss:       scalar, mean over the counted (``valid``) tokens; what ``backward`` sees.
    nll_sum:    float64 scalar, this draw's sum over counted tokens of the per-token NLL (bound)
                in nats (the training draw's estimate; validation uses :meth:`Family.val_nll`).
    num_tokens: int64 scalar, how many counted tokens ``nll_sum`` covers.
    metrics:    extra scalar tensors for logging (e.g. ``nelbo``, ``ce``); detached.
    histograms: detached 1-D tensors of per-token values (e.g. mdlm ATAT's ``importance``); the runner
                logs the latest as TensorBoard histograms and quantiles at its log points.
    """

    loss: Tensor
    nll_sum: Tensor
    num_tokens: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)


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


@dataclass
class DenoiseResult:
    """What :meth:`Family.denoise` returns for clean tokens (B, L) corrupted at one noise level.

    corrupted:     (B, L) ids of the corrupted input (mask id at noised positions), or None when the
                   corruption is not a token sequence (continuous noise).
    noised:        (B, L) bool, the positions the corruption touched (None: every position).
    reconstructed: (B, L) ids the model recovers from the corruption.
    metrics:       floats over the batch: ``accuracy`` (reconstructed == clean over real tokens) at
                   least; families add their own (``masked_accuracy``, ``cosine``, ...).
    method:        one line saying how the reconstruction was made (printed by ``difflm denoise``).
    """

    corrupted: Tensor | None
    noised: Tensor | None
    reconstructed: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    method: str = ""


class Family(nn.Module, ABC):
    """Base class of model families (mdlm, ar, ...)."""

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

    @abstractmethod
    @torch.no_grad()
    def sample(
        self, num: int, length: int, steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``num`` unconditional samples of ``length`` token ids (num, length) in ``steps`` steps."""

    # ---- training stages --------------------------------------------------------------------------

    def configure(self, diffusion: DiffusionConfig) -> None:
        """Apply a training stage's switches: the ``diffusion`` fields this family lists in
        ``FamilySpec.switches`` (spec validation lets a stage change only those). None by default."""

    def set_progress(self, fraction: float) -> None:
        """Share of the current training stage's steps done, in [0, 1], set before every train step
        (for curricula, e.g. mdlm's ATAT). Ignored by default."""

    @torch.no_grad()
    def diagnostics(
        self, tokens: Tensor, generator: torch.Generator | None, decode: Callable[[list[int]], str]
    ) -> Diagnostics:
        """Extra validation metrics on one clean val batch (B, L); none by default.

        Called on every rank (collectives under ZeRO-3 must match); only rank 0 logs the result.
        """
        return Diagnostics()

    # ---- sampling / evaluation API used by `difflm sample|eval|denoise` ---------------------------

    def samplers(self) -> dict[str, Sampler]:
        """This family's samplers by name, the default first; each is ``sampler(options, generator)``.

        The base version offers ``default``: :meth:`sample` without prompts, temperature or top-p.
        Families override it to expose their own (and to support those options)."""
        return {"default": self._default_sampler}

    @property
    def default_sampler(self) -> str:
        """The name ``difflm sample`` uses when none is given: the first of :meth:`samplers`."""
        return next(iter(self.samplers()))

    def _default_sampler(self, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
        from difflm.sampling.core import SampleOutput, reject_unsupported

        options.validate()
        reject_unsupported(options, "default", prompt=False, temperature=False)
        tokens = self.sample(options.num, options.length, options.steps, generator)  # (N, L)
        return SampleOutput(tokens=tokens, fixed=torch.zeros_like(tokens, dtype=torch.bool), nfe=options.steps)

    @torch.no_grad()
    def denoise(
        self, tokens: Tensor, valid: Tensor, t: float, generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> DenoiseResult:
        """Corrupt clean tokens (B, L) (only ``valid`` positions) at noise level t in [0, 1] and reconstruct.

        ``steps``: reconstruct with that many sampler steps from t; None: the family's one-shot estimate."""
        raise NotImplementedError(
            f"family {self.name!r} does not implement denoise (corrupt at a noise level and reconstruct)"
        )

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
