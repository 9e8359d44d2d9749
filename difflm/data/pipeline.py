"""Documents -> train/val split -> tokens -> packed blocks, cached on disk.

``prepare_data`` runs once (on the driver); worker processes call
``load_prepared(prepared.cache_dir)`` and memory-map the same arrays.

Split
    Document-level, so no document straddles train and val: a permutation of the
    document indices seeded by ``split_seed``; the first
    ``max(1, round(n * val_fraction))`` are val (at least one train document is
    kept). Both splits keep corpus order.
Packing (MDLM's "wrap", as used for OpenWebText)
    Each document's tokens are followed by EOS, the split's documents are
    concatenated into one stream, the stream is cut into chunks of ``seq_len - 2``
    tokens and each chunk becomes ``[BOS] + chunk + [EOS]``: every block is full
    (no padding, so the model's ``valid`` mask is all true) and ``seq_len`` long.
    The final partial chunk is dropped. The whole token stream of a split is held
    in memory while packing (int32: 4 bytes/token), fine up to a few 100M tokens.
Cache
    ``<cache_dir>/<key>/{train.npy, val.npy, tokenizer/, meta.json}``. The key
    hashes the data and tokenizer configs (minus ``cache_dir``), the path, size and
    mtime of every local source file (and of a local ``hf`` tokenizer folder), and
    a format version: editing a file or any setting makes a new entry. The entry is
    written into a private temp folder and renamed into place, so concurrent
    processes never see a half-written entry (the loser of a race discards its
    copy). A trained BPE tokenizer is cached separately under
    ``<cache_dir>/tokenizers/`` so another ``seq_len`` does not retrain it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from difflm.data.config import DataConfig, TokenizerConfig
from difflm.data.errors import DataError
from difflm.data.sources import load_documents, source_files
from difflm.data.tokenization import META_FILE as TOKENIZER_META
from difflm.data.tokenization import Tokenizer, bpe_cache_path, build_tokenizer, load_tokenizer

__all__ = ["PreparedData", "prepare_data", "load_prepared", "split_documents", "token_stream", "pack_blocks",
           "cache_key"]

#: Bump when the packing, splitting or file layout changes, so old cache entries are not reused.
FORMAT_VERSION = 1
META_FILE = "meta.json"
_ENCODE_CHUNK = 2048  # documents per encode_batch call: bounds memory of the Python id lists


@dataclass
class PreparedData:
    """Packed, tokenized train/val blocks and the tokenizer that made them.

    train, val: ``(N, seq_len)`` int32 arrays (memory-mapped when loaded from cache);
        each row is ``[BOS] + seq_len-2 tokens + [EOS]``.
    tokenizer:  the tokenizer of the ids (vocab size, specials, decode for samples).
    cache_dir:  the cache entry folder; other processes call ``load_prepared(cache_dir)``.
    stats:      ``train_documents``, ``val_documents``, ``train_tokens``, ``val_tokens``
        (text tokens plus one EOS per document), ``train_blocks``, ``val_blocks``,
        ``seq_len``, ``vocab_size``, ``prepare_seconds`` (of the run that built the
        entry) and ``from_cache`` (True when this call read an existing entry).
    """

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    cache_dir: Path
    stats: dict[str, Any]

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def prepare_data(data: DataConfig, tok: TokenizerConfig, log: Callable[[str], None] = print) -> PreparedData:
    """Read, split, tokenize and pack the corpus, or load the identical cached result."""
    root = Path(data.cache_dir).expanduser().resolve()
    key = cache_key(data, tok)
    final = root / key
    if (final / META_FILE).is_file():
        prepared = load_prepared(final)
        log(f"data: cache hit {final} ({_summary(prepared.stats)})")
        return prepared

    t0 = time.perf_counter()
    docs = load_documents(data)
    train_docs, val_docs = split_documents(docs, data.val_fraction, data.split_seed)
    log(f"data: {len(docs)} documents from {_describe(data)} -> train {len(train_docs)}, val {len(val_docs)}")
    if tok.kind == "bpe":
        cached = (bpe_cache_path(train_docs, tok.vocab_size, root) / TOKENIZER_META).is_file()
        log(f"data: BPE tokenizer (vocab {tok.vocab_size}): "
            + ("cached" if cached else f"training on {len(train_docs)} train documents..."))
    tokenizer = build_tokenizer(tok, train_docs, root)
    log(f"data: tokenizing {len(docs)} documents with {tokenizer.kind} (vocab {tokenizer.vocab_size})...")
    train_stream = token_stream(train_docs, tokenizer)
    val_stream = token_stream(val_docs, tokenizer)
    train = pack_blocks(train_stream, data.seq_len, tokenizer.bos_id, tokenizer.eos_id)
    val = pack_blocks(val_stream, data.seq_len, tokenizer.bos_id, tokenizer.eos_id)
    for name, blocks, stream, n_docs in (("validation", val, val_stream, len(val_docs)),
                                         ("train", train, train_stream, len(train_docs))):
        if len(blocks) == 0:
            raise DataError(
                f"corpus too small for seq_len {data.seq_len}: the {name} split ({n_docs} documents, "
                f"{len(stream)} tokens) does not fill one block of {data.seq_len - 2} tokens + BOS + EOS; "
                "lower data.seq_len, raise data.val_fraction, or use more data (data.max_documents, data.path)"
            )
    stats: dict[str, Any] = {
        "train_documents": len(train_docs), "val_documents": len(val_docs),
        "train_tokens": int(len(train_stream)), "val_tokens": int(len(val_stream)),
        "train_blocks": int(len(train)), "val_blocks": int(len(val)),
        "seq_len": data.seq_len, "vocab_size": tokenizer.vocab_size,
        "prepare_seconds": round(time.perf_counter() - t0, 3),
    }
    meta = {"format_version": FORMAT_VERSION, "key": key, "data": data.model_dump(mode="json"),
            "tokenizer": tok.model_dump(mode="json"), "stats": stats}
    final = _write_entry(root, key, train, val, tokenizer, meta)
    prepared = load_prepared(final)
    prepared.stats["from_cache"] = False
    log(f"data: cached at {final} ({_summary(prepared.stats)})")
    return prepared


def load_prepared(cache_dir: str | os.PathLike[str]) -> PreparedData:
    """Open the cache entry ``cache_dir`` (a ``PreparedData.cache_dir``); arrays are memory-mapped."""
    d = Path(cache_dir)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise DataError(f"no prepared data in {str(d)!r} ({META_FILE} missing); "
                        "run prepare_data first and pass its PreparedData.cache_dir")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{str(d)!r} was written by another data format version "
                        f"({meta.get('format_version')} != {FORMAT_VERSION}); delete it and prepare again")
    train = np.load(d / "train.npy", mmap_mode="r")
    val = np.load(d / "val.npy", mmap_mode="r")
    stats = dict(meta["stats"], from_cache=True)
    return PreparedData(train=train, val=val, tokenizer=load_tokenizer(d / "tokenizer"), cache_dir=d, stats=stats)


# ----------------------------------------------------------------------------- steps


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic document-level split: (train, val), each in corpus order, both non-empty."""
    n = len(docs)
    if n < 2:
        raise DataError(f"need at least 2 documents for a train/val split, got {n}; add data "
                        "(or for text files, separate documents with blank lines)")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:n_val]] = True
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def token_stream(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """All documents' ids, each followed by EOS, as one int32 array."""
    eos = [tokenizer.eos_id]
    parts: list[np.ndarray] = []
    for i in range(0, len(docs), _ENCODE_CHUNK):
        ids = tokenizer.encode_batch(docs[i:i + _ENCODE_CHUNK])
        count = sum(len(x) for x in ids) + len(ids)
        flat = itertools.chain.from_iterable(itertools.chain.from_iterable((x, eos) for x in ids))
        parts.append(np.fromiter(flat, dtype=np.int32, count=count))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def pack_blocks(stream: np.ndarray, seq_len: int, bos_id: int, eos_id: int) -> np.ndarray:
    """Cut ``stream`` into ``[BOS] + (seq_len-2) tokens + [EOS]`` rows; the remainder is dropped."""
    if seq_len < 3:
        raise DataError(f"seq_len must be at least 3 (BOS + 1 token + EOS), got {seq_len}")
    chunk = seq_len - 2
    n = len(stream) // chunk
    blocks = np.empty((n, seq_len), dtype=np.int32)
    blocks[:, 0] = bos_id
    blocks[:, -1] = eos_id
    blocks[:, 1:-1] = stream[: n * chunk].reshape(n, chunk)
    return blocks


# ----------------------------------------------------------------------------- cache


def cache_key(data: DataConfig, tok: TokenizerConfig) -> str:
    """Cache entry name: readable prefix + hash of everything that changes the blocks."""
    files = [[str(p), st.st_size, st.st_mtime_ns] for p in source_files(data) for st in [p.stat()]]
    tok_fields: dict[str, Any] = {"kind": tok.kind}  # only the fields that matter for this kind
    if tok.kind == "bpe":
        tok_fields["vocab_size"] = tok.vocab_size
    elif tok.kind == "hf":
        assert tok.name is not None
        tok_fields["name"] = tok.name
        local = Path(tok.name).expanduser()
        if local.is_dir():
            tok_fields["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                                   for p in sorted(local.rglob("*")) if p.is_file()]
    payload = {
        "format_version": FORMAT_VERSION,
        "data": data.model_dump(mode="json", exclude={"cache_dir"}),
        "tokenizer": tok_fields,
        "files": files,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{data.source}-{tok.kind}-L{data.seq_len}-{digest}"


def _write_entry(root: Path, key: str, train: np.ndarray, val: np.ndarray, tokenizer: Tokenizer,
                 meta: dict[str, Any]) -> Path:
    """Write the entry in a temp folder, then rename it into place (atomic on one filesystem)."""
    final = root / key
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        tokenizer.save(tmp / "tokenizer")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / META_FILE).is_file():  # another process won the race; its entry is identical
            return final
        raise
    return final


def _describe(data: DataConfig) -> str:
    return "the built-in corpus" if data.source == "builtin" else f"{data.source} {data.path}"


def _summary(stats: dict[str, Any]) -> str:
    return (f"train {stats['train_blocks']} blocks / {stats['train_tokens']} tokens, "
            f"val {stats['val_blocks']} blocks / {stats['val_tokens']} tokens, seq_len {stats['seq_len']}")
