"""Sample-quality diagnostics: numbers that flag repetition and collapse before anyone reads samples.

The failures seen in the seed journals showed up in samples first: a word repeated
("leading leading leading"), gibberish, and one generic sentence for every input. These
statistics are computed on *words* (whitespace-split decoded text), so they read the same
for byte-level and BPE models:

distinct_n             unique n-grams / all n-grams, pooled over the sample set (Li et al., 2016).
                       Low: the set reuses the same words/phrases.
within_distinct_1      mean over samples of each sample's own distinct-1 (samples of >= 10 words).
                       Low: every sample cycles through a handful of words ("te the te th the").
repeated_ngram_rate    share of each sample's word trigrams that already occurred earlier in the
                       same sample, pooled (seq-rep-3, Welleck et al., 2019). High: loops.
duplicate_fraction     share of samples that are an exact copy of an earlier one (whitespace
                       normalised). High: mode collapse.
mean_length            mean words per sample.
longest_run            most consecutive repeats of one word in any sample.

n-gram statistics are NaN when no sample has n words (undefined, not zero). The warning
thresholds below are heuristics for short samples (tens of words) of English-like text.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "SampleDiagnostics",
    "sample_diagnostics",
    "distinct_n",
    "repeated_ngram_rate",
    "duplicate_fraction",
    "longest_run",
    "REPEAT_RATE_WARN",
    "RUN_WARN",
    "DUPLICATE_WARN",
    "DISTINCT_2_WARN",
    "WITHIN_DISTINCT_1_WARN",
]

REPEAT_RATE_WARN = 0.2  # trigram repeats within a sample; natural short text is near 0
RUN_WARN = 4  # the same word this many times in a row
DUPLICATE_WARN = 0.25  # share of samples copying an earlier one
DISTINCT_2_WARN = 0.3  # pooled distinct bigrams; diverse text is above 0.8
WITHIN_DISTINCT_1_WARN = 0.4  # a 20-40 word English sample has 0.7-0.9 of its words distinct
MIN_WORDS_FOR_WITHIN = 10
MIN_NGRAMS_FOR_DISTINCT = 20  # below this many bigrams distinct-2 says little


def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[Hashable]], n: int) -> float:
    """Unique n-grams / total n-grams over all sequences (pooled); NaN without any n-gram."""
    grams = [g for s in seqs for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repeated_ngram_rate(seqs: Sequence[Sequence[Hashable]], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same sequence, pooled; NaN without any n-gram."""
    total = repeats = 0
    for s in seqs:
        grams = _ngrams(s, n)
        total += len(grams)
        repeats += len(grams) - len(set(grams))
    return repeats / total if total else math.nan


def duplicate_fraction(texts: Sequence[str]) -> float:
    """Share of texts equal (whitespace-normalised) to an earlier one: 1 - unique / total; 0 for no texts."""
    if not texts:
        return 0.0
    norm = [" ".join(t.split()) for t in texts]
    return 1.0 - len(set(norm)) / len(norm)


def longest_run(seq: Sequence[Hashable]) -> int:
    """Longest stretch of one item repeated back to back (1 for no repeat, 0 for empty)."""
    best = run = 0
    prev: object = object()
    for item in seq:
        run = run + 1 if item == prev else 1
        best = max(best, run)
        prev = item
    return best


@dataclass
class SampleDiagnostics:
    """The statistics of one sample set and the plain-language warnings they raise."""

    num_samples: int
    distinct_1: float
    distinct_2: float
    distinct_3: float
    within_distinct_1: float
    repeated_ngram_rate: float
    duplicate_fraction: float
    mean_length: float
    longest_run: int
    warnings: list[str] = field(default_factory=list)

    def scalars(self) -> dict[str, float]:
        """Finite statistics by name (for TensorBoard ``samples/<name>``)."""
        values = {
            "distinct_1": self.distinct_1,
            "distinct_2": self.distinct_2,
            "distinct_3": self.distinct_3,
            "within_distinct_1": self.within_distinct_1,
            "repeated_ngram_rate": self.repeated_ngram_rate,
            "duplicate_fraction": self.duplicate_fraction,
            "mean_length": self.mean_length,
            "longest_run": float(self.longest_run),
        }
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}

    def summary(self) -> str:
        """One line for the console."""

        def f(v: float) -> str:
            return "n/a" if not math.isfinite(v) else f"{v:.3f}"

        return (
            f"distinct-1/2/3 {f(self.distinct_1)}/{f(self.distinct_2)}/{f(self.distinct_3)} "
            f"(within a sample {f(self.within_distinct_1)})  "
            f"repeated 3-grams {f(self.repeated_ngram_rate)}  duplicates {f(self.duplicate_fraction)}  "
            f"mean length {self.mean_length:.1f} words  longest word run {self.longest_run}"
        )


def sample_diagnostics(texts: Sequence[str]) -> SampleDiagnostics:
    """Diagnostics of decoded sample ``texts`` (see the module docstring) with warnings."""
    words = [t.split() for t in texts]
    runs = [longest_run(w) for w in words]
    own = [len(set(w)) / len(w) for w in words if len(w) >= MIN_WORDS_FOR_WITHIN]
    d = SampleDiagnostics(
        num_samples=len(texts),
        distinct_1=distinct_n(words, 1),
        distinct_2=distinct_n(words, 2),
        distinct_3=distinct_n(words, 3),
        within_distinct_1=sum(own) / len(own) if own else math.nan,
        repeated_ngram_rate=repeated_ngram_rate(words, 3),
        duplicate_fraction=duplicate_fraction(texts),
        mean_length=sum(len(w) for w in words) / len(words) if words else 0.0,
        longest_run=max(runs, default=0),
    )
    d.warnings = _warnings(d, texts, words, runs)
    return d


def _warnings(d: SampleDiagnostics, texts: Sequence[str], words: list[list[str]], runs: list[int]) -> list[str]:
    out: list[str] = []
    empty = sum(1 for w in words if not w)
    if empty:
        out.append(f"{empty} of {len(texts)} samples are empty (only special tokens or whitespace)")
    if d.longest_run >= RUN_WARN:
        i = runs.index(d.longest_run)
        word = next(w for w, n in _runs(words[i]) if n == d.longest_run)
        out.append(
            f"repetition: sample {i} repeats {word!r} {d.longest_run} times in a row "
            "(typical of an undertrained model, too few sampling steps or a low temperature)"
        )
    if math.isfinite(d.repeated_ngram_rate) and d.repeated_ngram_rate >= REPEAT_RATE_WARN:
        out.append(
            f"repetition: {d.repeated_ngram_rate:.0%} of word trigrams recur within their sample "
            "(samples loop over the same phrase)"
        )
    if len(texts) >= 2 and d.duplicate_fraction >= DUPLICATE_WARN:
        copies = round(d.duplicate_fraction * len(texts))
        out.append(
            f"collapse: {copies} of {len(texts)} samples are exact copies of another sample "
            "(the model produces one generic text; check the loss weighting and the sampler)"
        )
    if math.isfinite(d.within_distinct_1) and d.within_distinct_1 < WITHIN_DISTINCT_1_WARN:
        out.append(
            f"repetition: a sample uses few different words (on average {d.within_distinct_1:.0%} of its words "
            "are distinct; natural text of this length: 70-90%)"
        )
    bigrams = sum(max(0, len(w) - 1) for w in words)
    if bigrams >= MIN_NGRAMS_FOR_DISTINCT and d.distinct_2 < DISTINCT_2_WARN:
        out.append(
            f"collapse: only {d.distinct_2:.0%} of word bigrams are distinct across the samples "
            "(the samples reuse the same few phrases)"
        )
    return out


def _runs(seq: Sequence[str]) -> list[tuple[str, int]]:
    """(item, length) of each maximal back-to-back run."""
    out: list[tuple[str, int]] = []
    for item in seq:
        if out and out[-1][0] == item:
            out[-1] = (item, out[-1][1] + 1)
        else:
            out.append((item, 1))
    return out
