"""What every sampler shares: the request (:class:`SampleOptions`), the result (:class:`SampleOutput`),
the per-family registry lookup (:func:`get_sampler`) and the categorical draw with temperature / top-p.

A family registers its samplers in its registry entry (``FamilySpec.samplers``, default named there);
``Family.samplers()`` binds them to the model, default first, and each bound callable takes
``(options, generator)`` and returns a :class:`SampleOutput`. There is no central switch on
sampler names: a new family (or a new sampler of an old one) plugs into ``difflm sample`` by
registering one more entry.

The request/result types are :mod:`difflm.types`' (re-exported here); this module imports nothing
from :mod:`difflm.families` (the families import it), so it has no import cycle with them.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor

# The request/result types live in the leaf types module (families and evaluation share it); re-exported here.
from difflm.types import (
    CACHES,
    REMASKING,
    SAMPLE_DTYPES,
    CacheKind,
    Remasking,
    SampleDtype,
    SampleOptions,
    SampleOutput,
    Sampler,
    SamplerHost,
    SamplingError,
)

#: The float type of the Gumbel noise of every categorical draw in the current sampler call. A context
#: variable (set from ``SampleOptions.sample_dtype`` by the samplers :func:`get_sampler` returns) so
#: that no family's sampler has to pass it down to each draw.
_DRAW_DTYPE: contextvars.ContextVar[str] = contextvars.ContextVar("difflm_draw_dtype", default="float64")


def get_sampler(family: SamplerHost, name: str) -> Sampler:
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
            "the ddpm and ddpm_cache samplers of mdlm and bijective and to bd3lm (its own exact cache)")
