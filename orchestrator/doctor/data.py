"""Data checks: tokens available, unknown tokens, blocks of seq_len, a tokenize/decode round trip.

Uses the same ``prepare_data`` as training (and its cache), so what passes here is what the run reads.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from difflm.data import DataError, PreparedData, prepare_data
from orchestrator.doctor.report import Check, fmt_count
from orchestrator.spec.run import RunSpec

#: a fixed text with punctuation, digits and non-ASCII letters for the round trip
PROBE_TEXT = "The capital of India is New Delhi. Naïve café owners paid 3.14 € — «quoted»!"

#: tokens sampled for the unknown-token rate
_UNK_SAMPLE = 200_000


def prepare(spec: RunSpec, log: Callable[[str], None]) -> tuple[Check, PreparedData | None]:
    """Tokenize (or load the cache) and count what the run will see; FAIL on a data error."""
    try:
        data = prepare_data(spec.data, spec.tokenizer, log=log)
    except DataError as exc:
        return Check("FAIL", "data", str(exc)), None
    st = data.stats
    t, s = spec.train, spec.scaling
    global_batch = t.micro_batch_size * t.grad_accum * s.num_workers
    train_blocks, val_blocks = len(data.train), len(data.val)
    msg = (f"{fmt_count(st['train_tokens'])} train / {fmt_count(st['val_tokens'])} val tokens -> {train_blocks:,} train "
           f"and {val_blocks:,} val blocks of {spec.data.seq_len}, vocab {data.tokenizer.vocab_size:,} "
           f"({data.tokenizer.kind})")
    per_worker = train_blocks // max(1, s.num_workers)
    if per_worker < t.micro_batch_size * t.grad_accum:
        return Check("FAIL", "data", f"{msg}; each of {s.num_workers} workers gets {per_worker} train blocks, fewer "
                                     f"than one step's {t.micro_batch_size * t.grad_accum}: lower seq_len or the "
                                     "batch, or add data"), data
    if train_blocks < global_batch * 4:
        return Check("WARN", "data", f"{msg}; only {train_blocks // global_batch} distinct batches: the run will "
                                     "mostly repeat them"), data
    return Check("PASS", "data", msg), data


def unknown_check(data: PreparedData) -> Check:
    """Share of the unknown token in (a sample of) the train blocks."""
    unk = data.tokenizer.unk_id
    if unk is None:
        return Check("PASS", "unknown tokens", f"none possible: the {data.tokenizer.kind} tokenizer represents every "
                                               "text (byte-level)")
    flat = np.asarray(data.train[: max(1, _UNK_SAMPLE // data.seq_len)]).ravel()
    rate = float(np.mean(flat == unk)) if flat.size else 0.0
    msg = f"{rate:.2%} of {fmt_count(flat.size)} sampled train tokens are the unknown token (id {unk})"
    if rate > 0.05:
        return Check("FAIL", "unknown tokens", f"{msg}: the model would learn to predict <unk>; use a tokenizer that "
                                               "covers the corpus (tokenizer.kind: byte or bpe)")
    if rate > 0.005:
        return Check("WARN", "unknown tokens", f"{msg}: text is being lost; consider tokenizer.kind: bpe")
    return Check("PASS", "unknown tokens", msg)


def round_trip_check(data: PreparedData) -> Check:
    """decode(encode(text)) == text for a probe sentence and for corpus text (the first val block's)."""
    tok = data.tokenizer
    corpus_text = tok.decode(np.asarray(data.val[0]).tolist())[:400]
    failures = []
    for label, text in (("probe", PROBE_TEXT), ("corpus", corpus_text)):
        back = tok.decode(tok.encode(text))
        if back != text:
            at = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
            failures.append(f"{label} text changes at character {at}: {text[max(0, at - 10):at + 20]!r} -> "
                            f"{back[max(0, at - 10):at + 20]!r}")
    n = len(tok.encode(PROBE_TEXT))
    if failures:
        return Check("WARN", "round trip", "; ".join(failures) + " (samples will not reproduce the text exactly)")
    return Check("PASS", "round trip", f"text -> ids -> text is exact (probe sentence: {len(PROBE_TEXT)} characters "
                                       f"-> {n} tokens; corpus: {len(corpus_text)} characters)")
