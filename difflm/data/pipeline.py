"""Documents -> train/val split -> token shards -> packed blocks, cached on disk, in bounded memory.

``prepare_data`` runs once (on the driver, or ``difflm data prepare``); worker processes call
``load_prepared(prepared.cache_dir)`` and memory-map the same arrays.

Two cache levels under ``data.cache_dir``:

``tokens/<key>/`` (:func:`prepare_tokens`): the token shards of a source and tokenizer
    The source is streamed (``sources.iter_documents``) and cut into chunks of
    ``data.chunk_chars`` characters; each chunk is split per document by hash
    (``split.val_mask``), tokenized and written as ``train/<k>.bin`` / ``val/<k>.bin``
    plus ``chunks/<k>.json`` (``shards.tokenize_chunk``). Chunks are tokenized by
    ``data.num_proc`` processes (or by Ray Data tasks across a cluster: pass a
    ``runner``, see ``orchestrator/data``); the driver holds at most ``num_proc + 1``
    chunks, so memory does not grow with the corpus. ``index.json`` is written last
    and marks the folder complete: a folder without it (an interrupted run) is never
    read as data, and the next preparation resumes it from its finished chunks. The key
    hashes the source settings, the files (path, size, mtime), the tokenizer and
    ``chunk_chars``; not ``seq_len``, ``val_tokens``, ``num_proc``.
``<source>-<tok>-L<seq_len>-<hash>/``: packed blocks (what training reads)
    ``train.npy`` / ``val.npy`` of shape ``(N, seq_len)`` in the token dtype, a copy of
    the tokenizer and ``meta.json``, built from the token shards in one streaming pass
    (a copy at disk speed, no tokenization): another ``seq_len`` or ``val_tokens`` makes
    a new entry from the same shards. Written in a temp folder and renamed into place.

Packing (MDLM's "wrap", as used for OpenWebText)
    Each document's tokens are followed by EOS, the split's shards are concatenated in
    chunk order (= corpus order), the stream is cut into chunks of ``seq_len - 2``
    tokens and each becomes ``[BOS] + chunk + [EOS]``: every block is full and
    ``seq_len`` long; the final partial chunk is dropped. ``data.val_tokens`` keeps only
    the first ``val_tokens // (seq_len - 2)`` val blocks.
Tokenizer
    ``bpe`` is trained on a sample: the first train documents of the stream up to
    ``tokenizer.train_sample_bytes`` (cached under ``<cache_dir>/tokenizers/``).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from difflm.atomic import atomic_write_text
from difflm.data.config import DataConfig, TokenizerConfig
from difflm.data.errors import DataError
from difflm.data.shards import (ChunkResult, ChunkTask, ShardJob, chunk_record_path, read_chunk_record, shard_path,
                                token_dtype, tokenize_chunk)
from difflm.data.sources import ReadReport, iter_documents, source_files
from difflm.data.split import split_documents, val_mask
from difflm.data.tokenization import META_FILE as TOKENIZER_META
from difflm.data.tokenization import Tokenizer, bpe_cache_path, build_tokenizer, load_tokenizer

__all__ = ["PreparedData", "prepare_data", "prepare_tokens", "load_prepared", "split_documents", "token_stream",
           "pack_blocks", "cache_key", "tokens_key", "Progress", "ChunkRunner", "local_runner", "read_index",
           "describe_cache"]

#: Bump when the packing, splitting or file layout changes, so old cache entries are not reused.
FORMAT_VERSION = 2
META_FILE = "meta.json"
INDEX_FILE = "index.json"
PROGRESS_LOG = "progress.log"
PROGRESS_EVERY_S = 10.0


@dataclass
class PreparedData:
    """Packed, tokenized train/val blocks and the tokenizer that made them.

    train, val: ``(N, seq_len)`` arrays of the token dtype (uint16 or uint32; memory-mapped
        when loaded from cache); each row is ``[BOS] + seq_len-2 tokens + [EOS]``.
    tokenizer:  the tokenizer of the ids (vocab size, specials, decode for samples).
    cache_dir:  the cache entry folder; other processes call ``load_prepared(cache_dir)``.
    stats:      ``train_documents``, ``val_documents``, ``train_tokens``, ``val_tokens``
        (text tokens plus one EOS per document, before any ``val_tokens`` cap), ``train_blocks``,
        ``val_blocks``, ``seq_len``, ``vocab_size``, ``skipped_records``, ``tokens_dir``,
        ``prepare_seconds`` (of the run that built the entry) and ``from_cache``.
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


@dataclass
class Progress:
    """A snapshot of a running preparation, for a progress bar (``difflm data prepare``) and the log file."""

    documents: int          # read from the source so far
    chunks_done: int
    tokens: int             # written so far (train + val)
    chars: int              # characters of the finished chunks
    elapsed_s: float
    total_bytes: int | None  # size of the local source files (None for a hub stream): the ETA's yardstick
    resumed_chars: int = 0  # characters of chunks finished by an earlier, interrupted run (not timed)

    @property
    def mb_per_s(self) -> float:
        return (self.chars - self.resumed_chars) / 1e6 / max(self.elapsed_s, 1e-9)

    @property
    def eta_s(self) -> float | None:
        """Seconds left, assuming characters ~ bytes (true for text/jsonl; parquet is compressed: rough)."""
        if not self.total_bytes or self.mb_per_s <= 0:
            return None
        return max(0.0, (self.total_bytes - self.chars) / 1e6 / self.mb_per_s)

    def line(self) -> str:
        eta = self.eta_s
        return (f"{self.documents:,} documents, {self.tokens:,} tokens, {self.chunks_done} chunks, "
                f"{self.mb_per_s:.2f} MB/s, elapsed {self.elapsed_s:.0f} s"
                + (f", ETA ~{eta:.0f} s" if eta is not None else ""))


class ChunkRunner(Protocol):
    """Runs :func:`difflm.data.shards.tokenize_chunk` over chunks, yielding their results in any order.

    It must pull tasks lazily (at most a few in flight) so the driver's memory stays bounded.
    """

    def __call__(self, job: ShardJob, tasks: Iterator[ChunkTask]) -> Iterator[ChunkResult]: ...


def _pool_init() -> None:
    """A pool worker tokenizes one chunk at a time on one core: the pool is the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def local_runner(num_proc: int) -> ChunkRunner:
    """``num_proc`` processes on this machine (1: in this process, where Rust tokenizers use their threads)."""

    def run(job: ShardJob, tasks: Iterator[ChunkTask]) -> Iterator[ChunkResult]:
        head = list(itertools.islice(tasks, 2))
        if num_proc <= 1 or len(head) < 2:  # one chunk (a small corpus): no pool to start (~1 s per process)
            for task in itertools.chain(head, tasks):
                yield tokenize_chunk(job, task)
            return
        tasks = itertools.chain(head, tasks)
        # spawn, not fork: a forked child of a process that already used the Rust tokenizer's
        # thread pool would deadlock or run single-threaded with a warning
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_pool_init) as pool:
            pending: deque[Future[ChunkResult]] = deque()
            for task in tasks:
                pending.append(pool.submit(tokenize_chunk, job, task))
                while len(pending) > num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    return run


def resolve_num_proc(data: DataConfig) -> int:
    """``auto`` is one process: the Rust tokenizer's thread pool already uses every CPU, and measured
    faster than one process per core (docs/benchmarks.md#data-preparation: 0.87 vs 0.70-0.77 M tokens/s
    on 2 cores, where the pool's workers compete with the reading driver)."""
    return 1 if data.num_proc == "auto" else int(data.num_proc)


# ----------------------------------------------------------------------------- prepare


def prepare_data(data: DataConfig, tok: TokenizerConfig, log: Callable[[str], None] = print,
                 progress: Callable[[Progress], None] | None = None,
                 runner: ChunkRunner | None = None) -> PreparedData:
    """Stream, split, tokenize and pack the corpus, or load the identical cached result."""
    root = Path(data.cache_dir).expanduser().resolve()
    key = cache_key(data, tok)
    final = root / key
    if (final / META_FILE).is_file():
        prepared = load_prepared(final)
        log(f"data: cache hit {final}, nothing to tokenize ({_summary(prepared.stats)})")
        return prepared
    t0 = time.perf_counter()
    tdir = prepare_tokens(data, tok, log=log, progress=progress, runner=runner)
    index = read_index(tdir)
    log(f"data: packing {index['train_tokens'] + index['val_tokens']:,} tokens of {tdir.name} into "
        f"seq_len {data.seq_len} blocks (no tokenization)...")
    final = _pack_entry(root, key, tdir, index, data)
    prepared = load_prepared(final)
    prepared.stats["from_cache"] = False
    prepared.stats["pack_seconds"] = round(time.perf_counter() - t0, 3)
    log(f"data: cached at {final} ({_summary(prepared.stats)})")
    return prepared


def prepare_tokens(data: DataConfig, tok: TokenizerConfig, log: Callable[[str], None] = print,
                   progress: Callable[[Progress], None] | None = None,
                   runner: ChunkRunner | None = None) -> Path:
    """The complete token-shard folder of ``data`` + ``tok``: found, resumed, or written now."""
    root = Path(data.cache_dir).expanduser().resolve()
    tdir = root / "tokens" / tokens_key(data, tok)
    if (tdir / INDEX_FILE).is_file():
        log(f"data: reusing the tokens at {tdir} (no tokenization)")
        return tdir
    tdir.mkdir(parents=True, exist_ok=True)
    with _locked(tdir / ".lock", log):
        if (tdir / INDEX_FILE).is_file():  # another process finished it while we waited
            log(f"data: reusing the tokens at {tdir} (no tokenization)")
            return tdir
        _tokenize_all(data, tok, root, tdir, log, progress,
                      runner if runner is not None else local_runner(resolve_num_proc(data)))
    return tdir


def _tokenize_all(data: DataConfig, tok: TokenizerConfig, root: Path, tdir: Path, log: Callable[[str], None],
                  progress: Callable[[Progress], None] | None, runner: ChunkRunner) -> None:
    t0 = time.perf_counter()
    tokenizer = _job_tokenizer(data, tok, root, tdir, log)
    job = ShardJob(out_dir=str(tdir), dtype=token_dtype(tokenizer.vocab_size), val_fraction=data.val_fraction,
                   split_seed=data.split_seed)
    done = {r.index: r for r in (read_chunk_record(p) for p in sorted((tdir / "chunks").glob("*.json")))}
    if done:
        log(f"data: resuming {tdir}: {len(done)} chunks were finished by an earlier run")
    report = ReadReport()
    try:
        total_bytes: int | None = sum(p.stat().st_size for p in source_files(data)) or None
    except DataError:
        raise
    if data.source == "builtin":
        total_bytes = None
    state = {"documents": 0}
    results: dict[int, ChunkResult] = dict(done)
    logfile = tdir / PROGRESS_LOG
    last_line = time.monotonic()
    resumed_chars = sum(r.chars for r in done.values())
    log(f"data: tokenizing {_describe(data)} with {tokenizer.kind} (vocab {tokenizer.vocab_size}, {job.dtype}) "
        f"in chunks of {data.chunk_chars:,} characters; progress lines in {logfile}")

    def snapshot() -> Progress:
        return Progress(documents=state["documents"], chunks_done=len(results),
                        tokens=sum(r.train_tokens + r.val_tokens for r in results.values()),
                        chars=sum(r.chars for r in results.values()), elapsed_s=time.perf_counter() - t0,
                        total_bytes=total_bytes, resumed_chars=resumed_chars)

    with open(logfile, "a") as flog:
        flog.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} start ({len(done)} chunks already done)\n")
        for result in runner(job, _chunks(iter_documents(data, report), data.chunk_chars, done, state, tdir)):
            results[result.index] = result
            snap = snapshot()
            if progress is not None:
                progress(snap)
            if time.monotonic() - last_line >= PROGRESS_EVERY_S:
                flog.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {snap.line()}\n")
                flog.flush()
                last_line = time.monotonic()
        final = snapshot()
        flog.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} done: {final.line()}\n")
    if report.skipped:
        log(f"data: skipped {report.skipped} bad records (data.bad_records: skip), e.g. {'; '.join(report.examples)}")
    chunks = [results[i] for i in sorted(results)]
    if [c.index for c in chunks] != list(range(len(chunks))):
        raise DataError(f"token cache {tdir} is missing chunks {sorted(set(range(max(results) + 1)) - set(results))};"
                        " delete the folder and prepare again")
    index = {
        "format_version": FORMAT_VERSION, "dtype": job.dtype, "vocab_size": tokenizer.vocab_size,
        "chunk_chars": data.chunk_chars, "val_fraction": data.val_fraction, "split_seed": data.split_seed,
        "source": _describe(data),
        "documents": sum(c.documents for c in chunks),
        "train_documents": sum(c.train_documents for c in chunks),
        "val_documents": sum(c.val_documents for c in chunks),
        "train_tokens": sum(c.train_tokens for c in chunks), "val_tokens": sum(c.val_tokens for c in chunks),
        "chars": sum(c.chars for c in chunks),
        "skipped_records": report.skipped, "skipped_examples": report.examples,
        "prepare_seconds": round(time.perf_counter() - t0, 3),
        "chunks": [asdict(c) for c in chunks],
    }
    atomic_write_text(tdir / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    log(f"data: tokenized {index['documents']:,} documents -> {index['train_tokens']:,} train / "
        f"{index['val_tokens']:,} val tokens in {index['prepare_seconds']:.1f} s ({tdir})")


def _chunks(docs: Iterable[str], chunk_chars: int, done: dict[int, ChunkResult], state: dict[str, int],
            tdir: Path) -> Iterator[ChunkTask]:
    """Cut the document stream into chunks; chunks already finished are read past (checked), not yielded."""
    index = first = chars = 0
    buf: list[str] = []

    def flush() -> Iterator[ChunkTask]:
        prior = done.get(index)
        if prior is None:
            yield ChunkTask(index=index, first_doc=first, docs=buf, chars=chars)
        elif (prior.first_doc, prior.documents, prior.chars) != (first, len(buf), chars):
            raise DataError(f"the source changed since {tdir} was partly written (chunk {index}: documents "
                            f"{prior.first_doc}+{prior.documents} then, {first}+{len(buf)} now); "
                            "delete that folder and prepare again")

    for doc in docs:
        buf.append(doc)
        chars += len(doc)
        state["documents"] += 1
        if chars >= chunk_chars:
            yield from flush()
            index, first, chars, buf = index + 1, first + len(buf), 0, []
    if buf:
        yield from flush()


def _job_tokenizer(data: DataConfig, tok: TokenizerConfig, root: Path, tdir: Path,
                   log: Callable[[str], None]) -> Tokenizer:
    """The tokenizer saved in ``tdir/tokenizer`` (a BPE trained on the train sample first when needed)."""
    folder = tdir / "tokenizer"
    if (folder / TOKENIZER_META).is_file():
        return load_tokenizer(folder)
    sample: list[str] = []
    if tok.kind == "bpe":
        sample = _train_sample(data, tok.train_sample_bytes)
        cached = (bpe_cache_path(sample, tok.vocab_size, root) / TOKENIZER_META).is_file()
        log(f"data: BPE tokenizer (vocab {tok.vocab_size}): " + (
            "cached" if cached else f"training on a sample of {len(sample):,} train documents "
            f"({sum(len(d.encode()) for d in sample) / 1e6:.1f} MB, tokenizer.train_sample_bytes "
            f"{tok.train_sample_bytes:,})..."))
    tokenizer = build_tokenizer(tok, sample, root)
    tmp = tdir / f".tmp-tokenizer-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tokenizer.save(tmp)
    os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(folder)


def _train_sample(data: DataConfig, max_bytes: int) -> list[str]:
    """The first train documents of the stream (hash split) up to ``max_bytes`` UTF-8 bytes (at least one)."""
    sample: list[str] = []
    size = 0
    batch: list[str] = []
    first = 0

    def take() -> bool:
        nonlocal size
        for doc, is_val in zip(batch, val_mask(first, len(batch), data.val_fraction, data.split_seed)):
            if is_val:
                continue
            n = len(doc.encode("utf-8"))
            if sample and size + n > max_bytes:
                return True
            sample.append(doc)
            size += n
        return False

    for doc in iter_documents(data, ReadReport()):
        batch.append(doc)
        if len(batch) == 4096:
            if take():
                return sample
            first += len(batch)
            batch = []
    take()
    if not sample:
        raise DataError(f"no train documents in {_describe(data)} to train the BPE tokenizer on; "
                        "lower data.val_fraction or add data")
    return sample


# ----------------------------------------------------------------------------- packing


def _pack_entry(root: Path, key: str, tdir: Path, index: dict[str, Any], data: DataConfig) -> Path:
    """Write the packed entry ``root/key`` from the token shards (streaming, one shard in memory)."""
    tokenizer = load_tokenizer(tdir / "tokenizer")
    chunk = data.seq_len - 2
    if chunk < 1:
        raise DataError(f"seq_len must be at least 3 (BOS + 1 token + EOS), got {data.seq_len}")
    counts = {"train": index["train_tokens"] // chunk, "val": index["val_tokens"] // chunk}
    if data.val_tokens is not None:
        counts["val"] = min(counts["val"], max(1, data.val_tokens // chunk))
    for name, split in (("validation", "val"), ("train", "train")):
        if counts[split] == 0:
            raise DataError(
                f"corpus too small for seq_len {data.seq_len}: the {name} split ({index[f'{split}_documents']} "
                f"documents, {index[f'{split}_tokens']} tokens) does not fill one block of {chunk} tokens + BOS + "
                "EOS; lower data.seq_len, raise data.val_fraction, or use more data (data.max_documents, data.path)"
            )
    final = root / key
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for split in ("train", "val"):
            _pack_split(tdir, split, len(index["chunks"]), index["dtype"], counts[split], data.seq_len,
                        tokenizer.bos_id, tokenizer.eos_id, tmp / f"{split}.npy")
        shutil.copytree(tdir / "tokenizer", tmp / "tokenizer")
        stats = {k: index[k] for k in ("train_documents", "val_documents", "train_tokens", "val_tokens",
                                       "skipped_records", "prepare_seconds")}
        stats.update(train_blocks=counts["train"], val_blocks=counts["val"], seq_len=data.seq_len,
                     vocab_size=tokenizer.vocab_size, token_dtype=index["dtype"], tokens_dir=str(tdir))
        meta = {"format_version": FORMAT_VERSION, "key": key, "data": data.model_dump(mode="json"),
                "tokens_dir": str(tdir), "stats": stats}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / META_FILE).is_file():  # another process won the race; its entry is identical
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _pack_split(tdir: Path, split: str, n_chunks: int, dtype: str, n_blocks: int, seq_len: int, bos: int, eos: int,
                out_path: Path) -> None:
    """Write ``out_path`` (.npy) block by block with plain writes: one shard in memory, and no mapped
    output pages (those would count in this process's RSS as the file grows)."""
    chunk = seq_len - 2
    row = 0
    carry = np.zeros(0, dtype=dtype)
    with open(out_path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                "shape": (n_blocks, seq_len)})
        for i in range(n_chunks):
            if row >= n_blocks:
                break
            shard = np.fromfile(shard_path(tdir, split, i), dtype=dtype)
            buf = np.concatenate([carry, shard]) if len(carry) else shard
            rows = min(len(buf) // chunk, n_blocks - row)
            block = np.empty((rows, seq_len), dtype=dtype)
            block[:, 0], block[:, -1] = bos, eos
            block[:, 1:-1] = buf[: rows * chunk].reshape(rows, chunk)
            block.tofile(f)
            row += rows
            carry = buf[rows * chunk:]
        f.flush()
        os.fsync(f.fileno())
    if row != n_blocks:
        raise DataError(f"token shards of {tdir} hold fewer {split} tokens than index.json says; "
                        "delete the folder and prepare again")


# ----------------------------------------------------------------------------- reading


def load_prepared(cache_dir: str | os.PathLike[str]) -> PreparedData:
    """Open the cache entry ``cache_dir`` (a ``PreparedData.cache_dir``); arrays are memory-mapped."""
    d = Path(cache_dir)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise DataError(f"no prepared data in {str(d)!r} ({META_FILE} missing); "
                        "run prepare_data (or `difflm data prepare SPEC`) first and pass its PreparedData.cache_dir")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{str(d)!r} was written by another data format version "
                        f"({meta.get('format_version')} != {FORMAT_VERSION}); delete it and prepare again")
    train = np.load(d / "train.npy", mmap_mode="r")
    val = np.load(d / "val.npy", mmap_mode="r")
    stats = dict(meta["stats"], from_cache=True)
    return PreparedData(train=train, val=val, tokenizer=load_tokenizer(d / "tokenizer"), cache_dir=d, stats=stats)


def read_index(tokens_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``index.json`` of a complete token folder; a folder without one (interrupted) is an error."""
    path = Path(tokens_dir) / INDEX_FILE
    if not path.is_file():
        raise DataError(f"{str(tokens_dir)!r} is not a complete token cache ({INDEX_FILE} missing: its preparation "
                        "was interrupted or is running); run `difflm data prepare SPEC` to finish it")
    index: dict[str, Any] = json.loads(path.read_text())
    return index


def describe_cache(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What a cache folder holds: a packed entry, a token folder (complete or partial), or a cache root."""
    d = Path(folder).expanduser().resolve()
    if (d / META_FILE).is_file():
        meta = json.loads((d / META_FILE).read_text())
        return {"kind": "packed", "path": str(d), **meta["stats"],
                "disk_bytes": sum(p.stat().st_size for p in d.rglob("*") if p.is_file())}
    if (d / INDEX_FILE).is_file():
        index = read_index(d)
        return {"kind": "tokens", "complete": True, "path": str(d),
                **{k: v for k, v in index.items() if k != "chunks"}, "chunk_count": len(index["chunks"]),
                "disk_bytes": sum(p.stat().st_size for p in d.rglob("*") if p.is_file())}
    if (d / "chunks").is_dir() or (d / "tokenizer").is_dir():
        records = [read_chunk_record(p) for p in sorted((d / "chunks").glob("*.json"))]
        return {"kind": "tokens", "complete": False, "path": str(d), "chunks_done": len(records),
                "documents": sum(r.documents for r in records),
                "tokens": sum(r.train_tokens + r.val_tokens for r in records)}
    if d.is_dir():
        entries = [describe_cache(p) for p in sorted(d.iterdir()) if (p / META_FILE).is_file()]
        tokens = [describe_cache(p) for p in sorted((d / "tokens").glob("*")) if p.is_dir()]
        return {"kind": "root", "path": str(d), "entries": entries, "tokens": tokens}
    raise DataError(f"{str(d)!r} is not a difflm data cache folder (no {META_FILE} or {INDEX_FILE})")


# ----------------------------------------------------------------------------- in-memory helpers


def token_stream(docs: list[str] | tuple[str, ...], tokenizer: Tokenizer) -> np.ndarray:
    """All documents' ids, each followed by EOS, as one int32 array (small corpora: eval of other text)."""
    from difflm.data.shards import encode_documents

    return encode_documents(tokenizer, list(docs), np.int32)


def pack_blocks(stream: np.ndarray, seq_len: int, bos_id: int, eos_id: int) -> np.ndarray:
    """Cut ``stream`` into ``[BOS] + (seq_len-2) tokens + [EOS]`` rows; the remainder is dropped."""
    if seq_len < 3:
        raise DataError(f"seq_len must be at least 3 (BOS + 1 token + EOS), got {seq_len}")
    chunk = seq_len - 2
    n = len(stream) // chunk
    blocks = np.empty((n, seq_len), dtype=stream.dtype)
    blocks[:, 0] = bos_id
    blocks[:, -1] = eos_id
    blocks[:, 1:-1] = stream[: n * chunk].reshape(n, chunk)
    return blocks


# ----------------------------------------------------------------------------- keys, files


def tokens_key(data: DataConfig, tok: TokenizerConfig) -> str:
    """Token folder name: what changes the token shards (not seq_len, val_tokens, num_proc)."""
    files = [[str(p), st.st_size, st.st_mtime_ns] for p in source_files(data) for st in [p.stat()]]
    tok_fields: dict[str, Any] = {"kind": tok.kind}  # only the fields that matter for this kind
    if tok.kind == "bpe":
        tok_fields["vocab_size"] = tok.vocab_size
        tok_fields["train_sample_bytes"] = tok.train_sample_bytes
    elif tok.kind == "hf":
        assert tok.name is not None
        tok_fields["name"] = tok.name
        local = Path(tok.name).expanduser()
        if local.is_dir():
            tok_fields["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                                   for p in sorted(local.rglob("*")) if p.is_file()]
    payload = {
        "format_version": FORMAT_VERSION,
        "data": data.model_dump(mode="json", exclude={"cache_dir", "seq_len", "val_tokens", "num_proc"}),
        "tokenizer": tok_fields,
        "files": files,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{data.source}-{tok.kind}-{digest}"


def cache_key(data: DataConfig, tok: TokenizerConfig) -> str:
    """Packed entry name: readable prefix + hash of the token folder, seq_len and val_tokens."""
    payload = {"tokens": tokens_key(data, tok), "seq_len": data.seq_len, "val_tokens": data.val_tokens}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{data.source}-{tok.kind}-L{data.seq_len}-{digest}"


@contextmanager
def _locked(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    """One preparer per token folder (another process or node waits, then reuses its result)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"data: another process is preparing {path.parent}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _describe(data: DataConfig) -> str:
    return "the built-in corpus" if data.source == "builtin" else f"{data.source} {data.path}"


def _summary(stats: dict[str, Any]) -> str:
    return (f"train {stats['train_blocks']} blocks / {stats['train_tokens']} tokens, "
            f"val {stats['val_blocks']} blocks / {stats['val_tokens']} tokens, seq_len {stats['seq_len']}")
