"""The types every family, the samplers and the evaluation share: a leaf module (it imports only torch).

Why a leaf: :mod:`difflm.evaluation`, :mod:`difflm.families.base`, :mod:`difflm.sampling.core` and each
family's ``model.py`` / ``samplers.py`` all speak these types. Kept here, none of them needs another
for its annotations, so there is no import knot (not even a ``TYPE_CHECKING`` one) between them.

* What one training forward returns: :class:`LossOutput`.
* The val noise every family's ``val_nll`` reads: :class:`ValNoise` (made by
  :func:`difflm.evaluation.make_val_noise`).
* A sampling request and its result: :class:`SampleOptions`, :class:`SampleOutput`,
  :class:`SamplingError`; a sampler bound to a model (:class:`Sampler`) and the unbound form a
  family registers (:class:`SamplerFn`, in ``FamilySpec.samplers``).
* The optional hooks' results and protocols: :class:`DenoiseResult` / :class:`Denoiser`,
  :class:`Diagnostics` / :class:`Diagnoser`. A family without them is valid; callers check with
  ``isinstance(model, Denoiser)`` (the protocols are runtime-checkable).
* An optional hook that adapts a training setting to val data at each eval point: :class:`ValTuner`
  (bd3lm's clip search), returning :class:`ValTuning`.
* What evaluation and the sampler lookup need of a model: :class:`Scorer`, :class:`SamplerHost`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

#: The masking-rate range the val estimator integrates over: all of (0, 1] (recorded in the draws' meta).
RATE_MIN: float = 0.0
RATE_MAX: float = 1.0

Remasking = Literal["random", "low_confidence", "threshold"]
REMASKING: tuple[str, ...] = ("random", "low_confidence", "threshold")
CacheKind = Literal["none", "prefix", "dual"]
CACHES: tuple[str, ...] = ("none", "prefix", "dual")
SampleDtype = Literal["float64", "float32"]
SAMPLE_DTYPES: tuple[str, ...] = ("float64", "float32")


# ---- training and validation ----------------------------------------------------------------------


@dataclass
class LossOutput:
    """What one forward pass of a family returns.

    loss:       scalar, mean over the counted (``valid``) tokens; what ``backward`` sees.
    nll_sum:    float64 scalar, this draw's sum over counted tokens of the per-token NLL (bound)
                in nats (the training draw's estimate; validation uses ``Family.val_nll``).
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
    """What a :class:`Denoiser` hook returns for clean tokens (B, L) corrupted at one noise level.

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


@dataclass(frozen=True)
class ValNoise:
    """The val noise of a batch of sequences, K draws each, as common random numbers.

    rates:    (B, K) masking rates in (0, 1]: ``m = F^-1(u)`` (F: the CDF of the rate density, module doc) where
              u (``uniform``) is stratified per sequence: draw k's u lies in the k-th of K equal strata of
              (0, 1) (one offset per sequence).
    uniforms: (B, K, L) U[0, 1) per position; in draw k, position j is masked iff
              ``uniforms[b, k, j] < rates[b, k]`` (and it is a counted position).
    seeds:    (B,) int64 per-sequence seeds for families that need other noise (e.g. Gaussian),
              also functions of (eval_seed, sequence index) only.
    weights:  (B, K) ``1 / p(m)``, the importance weight of each rate: a family's estimate of an integral
              over m in (0, 1] is ``weights[:, k] * integrand(m_k)`` averaged over k.
    uniform:  (B, K) the stratified u in (0, 1) behind each rate, for families that map it to their own
              time variable (diffusion_lm's importance distribution).
    """

    rates: Tensor
    uniforms: Tensor
    seeds: Tensor
    weights: Tensor
    uniform: Tensor
    rate_min: float = RATE_MIN
    rate_max: float = RATE_MAX

    @property
    def samples(self) -> int:
        return int(self.rates.shape[1])

    def masked(self, k: int, counted: Tensor) -> Tensor:
        """(B, L) bool: the positions masked in draw k (only counted positions are ever masked)."""
        return (self.uniforms[:, k] < self.rates[:, k, None]) & counted

# ---- sampling ------------------------------------------------------------------------------------


class SamplingError(ValueError):
    """A sampling request the user can fix (unknown sampler, bad option, prompt the family cannot do)."""


@dataclass(frozen=True)
class SampleOptions:
    """One sampling request; every family reads what it supports and rejects what it cannot honour.

    num, length, steps: samples, tokens per sample, denoising steps (per semi-AR window for mdlm).
    temperature:        divides the log-probabilities of every categorical draw; 0 = greedy (argmax).
    top_p:              nucleus sampling: draw only from the smallest set of ids holding ``top_p`` mass.
    template, fixed:    prompting: ids (length,) or (num, length) and a bool mask of the same shape;
                        ``fixed`` positions are copied from ``template`` and never change, the others
                        are generated (their template ids are ignored). None: unconditional.
    remasking:          mdlm: which masked positions a step reveals. ``random`` is the ancestral
                        sampler (each mask unmasks with the posterior probability); ``low_confidence``
                        (LLaDA) reveals the scheduled number of positions whose drawn token has the
                        highest probability, so confident tokens come first.
    window:             the length the model was trained on. mdlm samples longer than this are made
                        semi-autoregressively, ``window`` tokens at a time (None: no limit).
    stride:             semi-AR: new tokens per window after the first (None: window // 2).
    eps:                mdlm: the last time of the grid 1 -> eps.
    threshold:          remasking ``threshold`` (Fast-dLLM): each step reveals every mask of the current
                        block whose drawn token has probability > threshold, and at least the most
                        confident one per row; ``steps`` is then unused (a block ends when it has no mask).
    block_length:       semi-autoregressive block decoding inside the sample (Fast-dLLM / LLaDA): blocks
                        of this many positions are decoded left to right, the network seeing the whole
                        sample; ``steps`` is per block. None: one block (the whole sample). bd3lm: its
                        own trained block size is used and this must be None.
    cache:              mdlm block decoding: ``prefix`` reuses the keys/values of the positions before the
                        current block, ``dual`` also those after it, both refreshed once per block by a
                        full forward (approximate, Fast-dLLM v1); ``none`` recomputes everything.
    sample_dtype:       float type of the Gumbel noise of every categorical draw. ``float64`` (default)
                        samples the model's distribution; ``float32`` truncates the Gumbel tail (no
                        uniform closer to 1 than 2^-24), so ids with a relative probability below
                        ~1e-7 are (almost) never drawn: entropy drops and gen-PPL looks better.
                        It reproduces numbers published with float32 sampling (Zheng et al. 2024).
    """

    num: int = 1
    length: int = 128
    steps: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    template: Tensor | None = None
    fixed: Tensor | None = None
    remasking: Remasking = "random"
    window: int | None = None
    stride: int | None = None
    eps: float = 1e-5
    sample_dtype: SampleDtype = "float64"
    threshold: float = 0.9
    block_length: int | None = None
    cache: CacheKind = "none"

    def validate(self) -> None:
        """Raise :class:`SamplingError` naming the bad value and its allowed range."""
        if self.num < 1:
            raise SamplingError(f"num must be at least 1, got {self.num}")
        if self.length < 1:
            raise SamplingError(f"length must be at least 1, got {self.length}")
        if self.steps < 1:
            raise SamplingError(f"steps must be at least 1, got {self.steps}")
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.sample_dtype not in SAMPLE_DTYPES:
            raise SamplingError(f"sample_dtype must be one of {', '.join(SAMPLE_DTYPES)}, got {self.sample_dtype!r}")
        if self.remasking not in REMASKING:
            raise SamplingError(f"remasking must be one of {', '.join(REMASKING)}, got {self.remasking!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise SamplingError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.block_length is not None and self.block_length < 1:
            raise SamplingError(f"block_length must be at least 1, got {self.block_length}")
        if self.cache not in CACHES:
            raise SamplingError(f"cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if self.window is not None and self.window < 2:
            raise SamplingError(f"window must be at least 2, got {self.window}")
        if self.stride is not None and (self.stride < 1 or (self.window is not None and self.stride > self.window)):
            raise SamplingError(f"stride (new tokens per window) must be in [1, window={self.window}], got {self.stride}")
        if (self.template is None) != (self.fixed is None):
            raise SamplingError("template and fixed go together: give both or neither")
        if self.template is not None and self.fixed is not None:
            if self.template.shape != self.fixed.shape:
                raise SamplingError(f"template {tuple(self.template.shape)} and fixed {tuple(self.fixed.shape)} differ in shape")
            if self.template.shape[-1] != self.length or self.template.dim() not in (1, 2):
                raise SamplingError(
                    f"template must be (length,) or (num, length) with length={self.length}, got {tuple(self.template.shape)}"
                )
            if self.template.dim() == 2 and self.template.shape[0] != self.num:
                raise SamplingError(f"template has {self.template.shape[0]} rows but num={self.num}")

    @property
    def prompted(self) -> bool:
        """True when some positions are fixed by a prompt."""
        return self.fixed is not None and bool(self.fixed.any())


@dataclass
class SampleOutput:
    """What a sampler returns.

    tokens: (num, length) int64 ids in [0, vocab_size) (no mask ids).
    fixed:  (num, length) bool, the positions copied from the prompt template.
    nfe:    network function evaluations (forward passes of the whole batch): the cost that caching cuts.
    notes:  plain-language remarks for the user (e.g. "ddpm_cache fell back to ddpm because ...").
    """

    tokens: Tensor
    fixed: Tensor
    nfe: int
    notes: list[str] = field(default_factory=list)


class Sampler(Protocol):
    """A family's sampler, bound to the model: ``sampler(options, generator) -> SampleOutput``."""

    def __call__(self, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput: ...


class SamplerFn(Protocol):
    """A sampler as a family registers it (``FamilySpec.samplers``), unbound: ``fn(model, options, generator)``.

    :meth:`difflm.families.base.Family.samplers` binds each to the model."""

    def __call__(self, model: Any, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput: ...


# ---- what callers need of a model ----------------------------------------------------------------


class Scorer(Protocol):
    """What :func:`difflm.evaluation.val_pass` needs of a model: ``val_nll`` (see ``Family.val_nll``)."""

    def val_nll(self, tokens: Tensor, counted: Tensor, noise: ValNoise) -> Tensor: ...


class SamplerHost(Protocol):
    """What :func:`difflm.sampling.get_sampler` needs of a model: its name and its bound samplers."""

    name: str

    def samplers(self) -> Mapping[str, Sampler]: ...


@runtime_checkable
class Denoiser(Protocol):
    """Optional hook: corrupt clean tokens (B, L) (only ``valid`` positions) at noise level t in [0, 1] and
    reconstruct (``difflm denoise``). ``steps``: reconstruct with that many sampler steps from t; None: the
    family's one-shot estimate. A family without a noise process (ar) has none."""

    def denoise(
        self, tokens: Tensor, valid: Tensor, t: float, generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> DenoiseResult: ...


@runtime_checkable
class Diagnoser(Protocol):
    """Optional hook: extra validation metrics on one clean val batch (B, L), called at each eval on every
    rank (collectives under ZeRO-3 must match); only rank 0 logs the result."""

    def diagnostics(
        self, tokens: Tensor, generator: torch.Generator | None, decode: Callable[[list[int]], str]
    ) -> Diagnostics: ...


@dataclass
class ValTuning:
    """What a :class:`ValTuner` returns at an eval point.

    scalars: logged to TensorBoard under ``val/<name>`` (e.g. each candidate's loss variance).
    metrics: merged into the eval point's val metrics as ``val/<name>`` (TensorBoard, Tune's results,
             ``trainer_state.json``): the setting now in use (e.g. bd3lm's ``clip_beta``, ``clip_omega``).
    message: one console line for the user saying what changed (empty: nothing to say).
    """

    scalars: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


@runtime_checkable
class ValTuner(Protocol):
    """Optional hook: set a training-only setting from val data at each eval point after step 0 (bd3lm: the
    clipped noise range of lowest loss variance). The runner calls it on every rank, after validation, on
    the EMA weights in eval mode, with the worker's first ``val_tune_batches()`` val micro-batches as
    (tokens (B, L), counted (B, L)) pairs (the same count on every rank; a padding batch counts nothing),
    a generator seeded from (eval_seed, step, rank) and ``all_reduce`` (sum across workers, in place) so
    that every worker reaches the same setting. ``val_tune_batches() == 0``: nothing to tune this run.
    The setting must travel in the weights (a buffer) so that a resumed run continues with it."""

    def val_tune_batches(self) -> int: ...

    def val_tune(
        self, batches: list[tuple[Tensor, Tensor]], generator: torch.Generator, all_reduce: Callable[[Tensor], Tensor]
    ) -> ValTuning: ...
