"""The ar family's sampler: left to right, one token per network call.

Prompting is a prefix only (the model conditions on what is to the left); infilling a span
in the middle needs a model that sees both sides, i.e. a diffusion family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from difflm.sampling.core import SampleOptions, SampleOutput, SamplingError, adjust_log_probs, draw, reject_unsupported

if TYPE_CHECKING:
    from difflm.families.ar.model import AR

__all__ = ["ancestral", "prefix_length"]


def prefix_length(fixed: Tensor) -> int:
    """Length P of the fixed prefix of a (L,) or (N, L) mask; SamplingError when fixed positions follow a free one."""
    row = fixed if fixed.dim() == 1 else fixed[0]
    if fixed.dim() == 2 and not bool((fixed == row).all()):
        raise SamplingError("ar needs the same prompt in every row")
    free = (~row).nonzero()
    p = int(free[0]) if len(free) else int(row.numel())
    if bool(row[p:].any()):
        raise SamplingError(
            "ar samples left to right, so it can only continue a prefix prompt; "
            "infilling [MASK:n] spans needs a diffusion family (e.g. mdlm)"
        )
    return p


def ancestral(model: AR, options: SampleOptions, generator: torch.Generator | None = None) -> SampleOutput:
    """Left-to-right sampling of ``options.length`` tokens (``steps`` is ignored: one token per step).

    Starts from the prompt prefix when given, else from ``bos_id``; with neither the first token is drawn
    uniformly (the model has no distribution for position 0). No KV cache: each step re-runs the prefix."""
    options.validate()
    reject_unsupported(options, "ancestral")
    device = model.device
    n = options.num
    notes: list[str] = []
    if options.template is not None and options.fixed is not None and options.prompted:
        p = prefix_length(options.fixed)
        template = options.template.to(device=device, dtype=torch.long).expand(n, options.length)
        x = template[:, :p].clone()  # (N, P)
    elif model.bos_id is not None:
        x = torch.full((n, 1), model.bos_id, dtype=torch.long, device=device)  # (N, 1)
    else:
        x = torch.randint(0, model.vocab_size, (n, 1), generator=generator, device=device)  # (N, 1)
    p = x.shape[1] if options.prompted else 0
    nfe = 0
    while x.shape[1] < options.length:
        logits = model.backbone(x)[:, -1]  # (N, V)
        logp = adjust_log_probs(logits.float().log_softmax(dim=-1), options.temperature, options.top_p)
        nxt = draw(logp, options.temperature, generator)  # (N,)
        x = torch.cat([x, nxt[:, None]], dim=1)  # (N, P+1)
        nfe += 1
    fixed = torch.zeros(n, options.length, dtype=torch.bool, device=device)
    fixed[:, :p] = True
    return SampleOutput(tokens=x[:, : options.length], fixed=fixed, nfe=nfe, notes=notes)
