"""Sampling for every family: options, per-family sampler registry, prompting and sample diagnostics.

    from difflm.sampling import SampleOptions, get_sampler, build_template
    out = get_sampler(model, "ddpm_cache")(SampleOptions(num=4, length=128, steps=1000), generator)

Plain PyTorch (no ray/deepspeed). The family-specific samplers live in each family's package
(``difflm/families/<name>/samplers.py``) and are registered in its ``FamilySpec.samplers``;
``Family.samplers()`` binds them to a model. The request/result types are :mod:`difflm.types`'.
"""

from difflm.sampling.core import (
    REMASKING,
    SampleOptions,
    SampleOutput,
    Sampler,
    SamplingError,
    adjust_log_probs,
    draw,
    get_sampler,
    sample_categorical,
    start_tokens,
)
from difflm.sampling.diagnostics import SampleDiagnostics, sample_diagnostics
from difflm.sampling.prompting import Template, build_template, parse_prompt

__all__ = [
    "REMASKING",
    "SampleOptions",
    "SampleOutput",
    "Sampler",
    "SamplingError",
    "adjust_log_probs",
    "draw",
    "get_sampler",
    "sample_categorical",
    "start_tokens",
    "SampleDiagnostics",
    "sample_diagnostics",
    "Template",
    "build_template",
    "parse_prompt",
]
