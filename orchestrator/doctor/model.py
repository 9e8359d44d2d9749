"""Model size against the data and against the journal's rule of thumb.

The rule of thumb (from the seed journals): a model narrower than 128 never learned language
(their 64-wide model stayed at unigram statistics however long it trained); a model with more
parameters than training tokens, shown them many times, memorises instead of generalising; data
repeated 100 times overfits whatever the size; compute-optimal training sees about 20 tokens per
parameter (Chinchilla). The first three WARN; the last is information.
"""

from __future__ import annotations

from difflm.data import PreparedData
from difflm.families import Family
from orchestrator.doctor.report import Check, fmt_count
from orchestrator.spec.run import RunSpec

MIN_WIDTH = 128
MIN_PARAMS = 500_000


def size_check(spec: RunSpec, model: Family, data: PreparedData) -> Check:
    """Parameters against width, unique train tokens and the tokens the run will see."""
    n = model.num_parameters()
    width = spec.model.dims()["d_model"]
    t, s = spec.train, spec.scaling
    seen = t.max_steps * t.micro_batch_size * t.grad_accum * s.num_workers * spec.data.seq_len
    unique = int(data.stats["train_tokens"])
    epochs = seen / max(1, unique)
    msg = (f"{fmt_count(n)} parameters ({width} wide x {spec.model.dims()['n_layers']} layers); the run sees "
           f"{fmt_count(seen)} tokens = {seen / n:.2g} per parameter (~20 is compute-optimal) and "
           f"{epochs:.2g} passes over {fmt_count(unique)} unique train tokens")
    if width < MIN_WIDTH or n < MIN_PARAMS:
        return Check("WARN", "model size", f"{msg}. Far too small to learn language: the journal's 64-wide model "
                                           f"never did; use at least {MIN_WIDTH} wide (size: tiny is only for smoke "
                                           "tests; small or base to learn)")
    if n > unique and epochs > 20:
        return Check("WARN", "model size", f"{msg}. More parameters than training tokens, seen {epochs:.0f} times: "
                                           "expect memorisation, not language; add data or use a smaller size")
    if epochs > 100:
        return Check("WARN", "model size", f"{msg}. The data repeats {epochs:.0f} times: val NLL will turn up "
                                           "(overfitting) long before max_steps")
    return Check("PASS", "model size", msg)
