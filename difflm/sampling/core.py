"""What every sampler shares: the request (:class:`SampleOptions`), the result (:class:`SampleOutput`),
the per-family registry lookup (:func:`get_sampler`) and the categorical draw with temperature / top-p.

A family exposes its samplers as ``Family.samplers() -> {name: callable}``; each callable takes
``(options, generator)`` and returns a :class:`SampleOutput`. There is no central switch on
sampler names: the CLI asks the family for its dict, so a new family (or a new sampler of an
old one) plugs into ``difflm sample`` by returning one more entry.

This module imports nothing from :mod:`difflm.families` (the families import it), so it has
no import cycle with them.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from difflm.families.base import Family

Remasking = Literal["random", "low_confidence", "threshold"]
REMASKING: tuple[str, ...] = ("random", "low_confidence", "threshold")
CacheKind = Literal["none", "prefix", "dual"]
CACHES: tuple[str, ...] = ("none", "prefix", "dual")
SampleDtype = Literal["float64", "float32"]
SAMPLE_DTYPES: tuple[str, ...] = ("float64", "float32")

#: The float type of the Gumbel noise of every categorical draw in the current sampler call. A context
#: variable (set from ``SampleOptions.sample_dtype`` by the samplers :func:`get_sampler` returns) so
#: that no family's sampler has to pass it down to each draw.
_DRAW_DTYPE: contextvars.ContextVar[str] = contextvars.ContextVar("difflm_draw_dtype", default="float64")


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


def get_sampler(family: Family, name: str) -> Sampler:
    """The sampler ``name`` of ``family``; a :class:`SamplingError` listing the family's samplers otherwise."""
    table = family.samplers()
    try:
        fn = table[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SamplingError(
            f"unknown sampler {name!r} for family {family.name!r}; choose one of {', '.join(table)}.{hint}"
        ) from None
    return _with_draw_dtype(fn)


def _with_draw_dtype(fn: Sampler) -> Sampler:
    """``fn`` drawing its categoricals in ``options.sample_dtype`` (see :func:`draw_precision`)."""

    @functools.wraps(fn)
    def run(options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
        with draw_precision(options.sample_dtype):
            return fn(options, generator)

    return run


@contextlib.contextmanager
def draw_precision(dtype: str) -> Iterator[None]:
    """Every :func:`sample_categorical` inside draws its Gumbel noise in ``dtype`` (float64 | float32)."""
    if dtype not in SAMPLE_DTYPES:
        raise SamplingError(f"sample dtype must be one of {', '.join(SAMPLE_DTYPES)}, got {dtype!r}")
    token = _DRAW_DTYPE.set(dtype)
    try:
        yield
    finally:
        _DRAW_DTYPE.reset(token)


# ---- categorical draws -------------------------------------------------------------------------


def sample_categorical(log_probs: Tensor, generator: torch.Generator | None = None,
                       dtype: torch.dtype | None = None) -> Tensor:
    """One draw per row of (..., V) log-probabilities -> (...) int64, by Gumbel-max.

    The Gumbel noise is float64 by default (float32 on MPS, which has no float64; ``dtype`` or
    :func:`draw_precision` choose): in float32 its tail is truncated, which silently lowers the
    sampling temperature and the sample diversity of masked diffusion models (Zheng et al., 2024).
    -inf entries are never drawn.
    """
    if dtype is None:
        dtype = torch.float64 if _DRAW_DTYPE.get() == "float64" else torch.float32
    if log_probs.device.type == "mps":
        dtype = torch.float32
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=dtype)  # (..., V)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))  # (..., V)
    return (log_probs.to(dtype) + gumbel).argmax(dim=-1)  # (...)


def adjust_log_probs(log_probs: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """Temperature and nucleus (top-p) filtering of (..., V) log-probabilities, renormalised.

    temperature 0 leaves the values as they are (the draw is then an argmax, see :func:`draw`).
    top-p keeps, per row, the most likely ids until their mass reaches ``top_p`` (always at least
    the most likely one) and sets the rest to -inf. Identity (no copy) for temperature 1, top_p 1.
    """
    out = log_probs
    if temperature not in (0.0, 1.0):
        out = (out / temperature).log_softmax(dim=-1)  # (..., V)
    if top_p < 1.0:
        sorted_lp, order = out.sort(dim=-1, descending=True)  # (..., V) each
        probs = sorted_lp.exp()
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely ids
        sorted_lp = sorted_lp.masked_fill(before >= top_p, float("-inf"))
        out = torch.full_like(out, float("-inf")).scatter(-1, order, sorted_lp).log_softmax(dim=-1)
    return out


def draw(log_probs: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """(..., V) adjusted log-probabilities -> (...) ids: argmax at temperature 0 (no random draw), else Gumbel-max."""
    if temperature == 0.0:
        return log_probs.argmax(dim=-1)
    return sample_categorical(log_probs, generator)


# ---- templates ----------------------------------------------------------------------------------


def start_tokens(options: SampleOptions, fill_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The starting (num, length) ids and (num, length) fixed mask: template ids where fixed, ``fill_id`` elsewhere."""
    n, length = options.num, options.length
    if options.template is None or options.fixed is None:
        fixed = torch.zeros(n, length, dtype=torch.bool, device=device)
        return torch.full((n, length), fill_id, dtype=torch.long, device=device), fixed
    template = options.template.to(device=device, dtype=torch.long).expand(n, length)  # (N, L)
    fixed = options.fixed.to(device=device, dtype=torch.bool).expand(n, length)  # (N, L)
    x = torch.where(fixed, template, torch.full_like(template, fill_id))  # (N, L)
    return x.clone(), fixed.clone()


def reject_unsupported(options: SampleOptions, sampler: str, *, prompt: bool = True, temperature: bool = True,
                       remasking: bool = False) -> None:
    """SamplingError when ``options`` asks for something sampler ``sampler`` does not do."""
    if not prompt and options.prompted:
        raise SamplingError(f"sampler {sampler!r} does not support prompts")
    if not temperature and (options.temperature != 1.0 or options.top_p != 1.0):
        raise SamplingError(f"sampler {sampler!r} does not support temperature / top-p (leave them at 1)")
    if not remasking and options.remasking != "random":
        raise SamplingError(
            f"sampler {sampler!r} does not support remasking={options.remasking!r}; remasking low_confidence and "
            "threshold apply to the masked families: mdlm and bijective (samplers ddpm, ddpm_cache) and bd3lm")
    if options.cache != "none" or options.block_length is not None:
        raise SamplingError(
            f"sampler {sampler!r} does not do block decoding or KV caches (block_length / cache); they apply to "
            "mdlm's ddpm and ddpm_cache samplers (cache) and to bd3lm (its own exact cache)")
