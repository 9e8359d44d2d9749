"""Data for difflm: corpus sources, tokenizers, packed/cached train-val blocks, batch iterators.

Typical use (driver): ``prepared = prepare_data(spec.data, spec.tokenizer)``; workers:
``load_prepared(prepared.cache_dir)`` then ``iterate_train_batches(prepared.train, ...)``
(validation: :func:`difflm.evaluation.val_pass`).
Plain numpy/PyTorch-free; the ``datasets``/``transformers`` imports happen only for the
sources and tokenizer kinds that need them.
"""

from difflm.data.config import DataConfig, TokenizerConfig
from difflm.data.errors import DataError
from difflm.data.loader import iterate_train_batches, train_batches_per_epoch
from difflm.data.pipeline import PreparedData, Progress, load_prepared, prepare_data, prepare_tokens
from difflm.data.sources import iter_documents, load_documents
from difflm.data.tokenization import Tokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "TokenizerConfig",
    "DataError",
    "prepare_data",
    "prepare_tokens",
    "Progress",
    "iter_documents",
    "load_prepared",
    "PreparedData",
    "Tokenizer",
    "load_tokenizer",
    "build_tokenizer",
    "iterate_train_batches",
    "train_batches_per_epoch",
    "load_documents",
]
