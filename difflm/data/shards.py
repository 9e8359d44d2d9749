"""Token shards: one chunk of documents -> one train and one val file of token ids.

The corpus is read as a stream and cut into *chunks* of about ``data.chunk_chars``
characters (whole documents; chunk ``k`` holds documents ``first_doc .. first_doc + n - 1``
of the stream). :func:`tokenize_chunk` splits a chunk's documents into train and val
(:func:`difflm.data.split.val_mask`), tokenizes them, appends EOS to each document and
writes ``train/<k>.bin`` and ``val/<k>.bin`` (raw little-endian ``uint16`` when the vocab
has at most 65,536 ids, else ``uint32``), then ``chunks/<k>.json`` with the chunk's counts.
Every file is written under a temporary name and renamed, and the ``.json`` comes last, so a
chunk is finished exactly when its ``.json`` exists: an interrupted preparation resumes from
the finished chunks, and rewriting a chunk gives the same bytes (tokenization is
deterministic). Nothing here holds more than one chunk.

:func:`tokenize_chunk` is a plain function of a picklable :class:`ShardJob` and
:class:`ChunkTask`, so it runs the same in this process, in a process pool, or in a Ray Data
``map_batches`` task on another node (``orchestrator/data``) that sees the same ``cache_dir``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from difflm.atomic import atomic_save, atomic_write_text
from difflm.data.split import val_mask
from difflm.data.tokenization import META_FILE, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = ["ShardJob", "ChunkTask", "ChunkResult", "tokenize_chunk", "encode_documents", "token_dtype",
           "shard_path", "chunk_record_path", "read_chunk_record"]

#: documents per encode_batch call: bounds the Python id lists (~36 bytes per token) to a few MB
ENCODE_BATCH = 1024


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when every id fits in 16 bits, else ``uint32``: half the disk and page cache for most vocabs."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass(frozen=True)
class ShardJob:
    """What every chunk of one preparation shares (picklable, small)."""

    out_dir: str          # the token cache folder (train/, val/, chunks/, tokenizer/)
    dtype: str            # token_dtype(vocab)
    val_fraction: float
    split_seed: int


@dataclass
class ChunkTask:
    """A chunk of consecutive documents of the stream."""

    index: int
    first_doc: int
    docs: list[str]
    chars: int


@dataclass
class ChunkResult:
    """What a finished chunk wrote (also its ``chunks/<index>.json``)."""

    index: int
    first_doc: int
    documents: int
    chars: int
    train_documents: int
    val_documents: int
    train_tokens: int
    val_tokens: int


def shard_path(out_dir: str | os.PathLike[str], split: str, index: int) -> Path:
    return Path(out_dir) / split / f"{index:06d}.bin"


def chunk_record_path(out_dir: str | os.PathLike[str], index: int) -> Path:
    return Path(out_dir) / "chunks" / f"{index:06d}.json"


def read_chunk_record(path: Path) -> ChunkResult:
    return ChunkResult(**json.loads(path.read_text()))


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(out_dir: str) -> Tokenizer:
    """The job's tokenizer, loaded once per process (a Ray task or pool worker reuses it)."""
    folder = Path(out_dir) / "tokenizer"
    key = f"{out_dir}|{(folder / META_FILE).stat().st_mtime_ns}"  # a re-created cache folder is reloaded
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(folder)
    return _TOKENIZERS[key]


def encode_documents(tokenizer: Tokenizer, docs: Sequence[str], dtype: str | np.dtype[Any]) -> np.ndarray:
    """The ids of ``docs``, each followed by EOS, as one 1-D array of ``dtype``."""
    eos = tokenizer.eos_id
    if isinstance(tokenizer, ByteTokenizer):  # bytes are ids: no Python int per token
        eos_arr = np.array([eos], dtype=dtype)
        parts = itertools.chain.from_iterable((np.frombuffer(d.encode("utf-8"), np.uint8), eos_arr) for d in docs)
        return np.concatenate(list(parts), dtype=dtype) if docs else np.zeros(0, dtype=dtype)
    out: list[np.ndarray] = []
    for i in range(0, len(docs), ENCODE_BATCH):
        ids = tokenizer.encode_batch(docs[i:i + ENCODE_BATCH])
        count = sum(len(x) for x in ids) + len(ids)
        flat = itertools.chain.from_iterable(itertools.chain.from_iterable((x, (eos,)) for x in ids))
        out.append(np.fromiter(flat, dtype=dtype, count=count))
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def tokenize_chunk(job: ShardJob, task: ChunkTask) -> ChunkResult:
    """Split, tokenize and write one chunk; returns (and records) its counts."""
    tok = _tokenizer(job.out_dir)
    is_val = val_mask(task.first_doc, len(task.docs), job.val_fraction, job.split_seed)
    train_docs = [d for d, v in zip(task.docs, is_val) if not v]
    val_docs = [d for d, v in zip(task.docs, is_val) if v]
    train = encode_documents(tok, train_docs, job.dtype)
    val = encode_documents(tok, val_docs, job.dtype)
    atomic_save(shard_path(job.out_dir, "train", task.index), train.tofile)
    atomic_save(shard_path(job.out_dir, "val", task.index), val.tofile)
    result = ChunkResult(index=task.index, first_doc=task.first_doc, documents=len(task.docs), chars=task.chars,
                         train_documents=len(train_docs), val_documents=len(val_docs),
                         train_tokens=int(len(train)), val_tokens=int(len(val)))
    atomic_write_text(chunk_record_path(job.out_dir, task.index), json.dumps(asdict(result)) + "\n")
    return result
