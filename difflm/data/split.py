"""The document-level train/val split: a hash of each document's index and the split seed.

A document is validation when ``splitmix64(index ^ splitmix64(split_seed))``, read as a
uniform number in [0, 1), is below ``val_fraction``. The decision needs nothing but the
document's position in the source stream, so it is made while streaming (no pass over the
corpus first, no list of all documents), in any chunk, on any node, by any number of
processes, with the same answer. The index (not the content) is hashed because it is
cheaper and a corpus with duplicate documents still gets the advertised share; the cost
is that reordering the source files reshuffles the split (it also changes the cache key).

The val share is ``val_fraction`` in expectation, not exactly: 100 documents at 5% give
5 +- 2.2 val documents. Small corpora can therefore get no val document at all;
preparation then stops with a message (raise ``data.val_fraction``, add documents).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from difflm.data.errors import DataError

__all__ = ["val_mask", "split_documents"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijective 64-bit mixer), vectorised; wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def val_mask(first: int, count: int, val_fraction: float, seed: int) -> np.ndarray:
    """Whether documents ``first .. first + count - 1`` of the stream are validation (bool array)."""
    key = _splitmix64(np.array([seed], dtype=np.uint64))[0]
    h = _splitmix64(np.arange(first, first + count, dtype=np.uint64) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * (2.0 ** -53) < val_fraction


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) documents of an in-memory list, each in corpus order: the same split as preparation."""
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents for a train/val split, got {len(docs)}; add data "
                        "(or for text files, separate documents with blank lines)")
    is_val = val_mask(0, len(docs), val_fraction, seed)
    return ([d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v])
