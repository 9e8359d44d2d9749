"""Stream a corpus as documents (plain strings), whatever its source.

:func:`iter_documents` yields them one at a time, so preparing a corpus of any size holds
one document (and one parquet/hf batch) at a time here; :func:`load_documents` is the list
of them for small corpora and tests.

A *document* is the unit of the train/val split and of packing (each one ends with
EOS), so every source decides what a document is:

builtin
    The offline corpus that needs no download: the text of the Python reference
    manual that ships with every CPython as ``pydoc_data.topics.topics`` (~465 KB,
    79 topics). Real English prose, always present, license-clean (PSF). Topics are
    read in sorted key order and split at blank lines; each paragraph is unwrapped
    (hard line breaks become spaces) and kept as one document when it looks like
    prose: at least 8 words, no grammar productions (``::=``) or doctest prompts
    (``>>>``), and at least 85% ASCII-or-other letters and spaces. RST heading
    underlines (``*****``, ``=====``) are dropped. That leaves ~1,500 documents /
    ~330 KB. The exact text depends on the Python minor version, so the cache key
    includes the ``topics.py`` file's size and mtime.
text
    A ``.txt`` file, or a folder searched recursively for ``*.txt`` files in
    sorted relative-path order. Files are UTF-8. A file whose first non-blank line
    is a WikiText top-level heading (`` = Title = ``) is split into one document
    per article: each `` = Title = `` line starts a new document (the title line is
    kept; `` = = Section = = `` sub-headings stay inside the article), lines are
    stripped and blank lines dropped. WikiText's tokenisation artefacts
    (`` @-@ ``, `` <unk> ``) are kept as they are. Any other file is split at blank
    lines: each paragraph (stripped, inner newlines kept) is a document.
jsonl
    A ``.jsonl`` file, or a folder of them (sorted): one JSON object per line,
    the text in ``text_field``. Blank lines are skipped; ``null`` texts too.
parquet
    A ``.parquet`` file, or a folder of them (sorted); column ``text_field``.
hf
    ``datasets.load_dataset(path, hf_config, split=hf_split)`` (``streaming=True`` for a
    hub name: nothing is downloaded in full first), one document per non-empty row of ``text_field``. ``path`` may be a hub name (``wikitext``), a
    local folder that ``load_dataset`` reads (parquet/jsonl/csv files), a single
    local parquet/jsonl/json/csv/txt file (read with the matching packaged
    builder; its split is ``train``), or a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
    which is detected and read with ``load_from_disk``. Rows of WikiText-style data
    (hub ``wikitext``: one line per row, the first non-blank one a `` = Title = ``)
    are regrouped into articles exactly like a WikiText ``.txt`` file.

``data.path`` of text/jsonl/parquet may also be a glob (``shards/*.jsonl``,
``data/**/part-*.parquet``): the matching files in sorted order; a glob that matches
nothing is an error naming it.

Every source drops documents that are empty after stripping, then keeps the first
``max_documents``. Problems raise :class:`DataError` naming the file and line (text,
jsonl) or row (parquet): bad UTF-8, a jsonl line that is not a JSON object, a
truncated or corrupt parquet file. With ``data.bad_records: skip`` a bad jsonl line
or a text line that is not UTF-8 is skipped instead, counted in
:class:`ReadReport` (and reported by ``prepare_data``), never dropped silently.
"""

from __future__ import annotations

import glob
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflm.data.config import DataConfig
from difflm.data.errors import DataError

__all__ = ["load_documents", "iter_documents", "source_files", "builtin_documents", "ReadReport"]

# RST heading underline/overline: a line made of one repeated punctuation character.
_RST_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_MIN_PROSE_WORDS = 8
_MIN_PROSE_LETTER_SHARE = 0.85


@dataclass
class ReadReport:
    """What a pass over the source skipped (``data.bad_records: skip``): a count and the first few places."""

    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def skip(self, where: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(where)


def load_documents(cfg: DataConfig) -> list[str]:
    """All documents of the configured source as a list (small corpora; big ones use :func:`iter_documents`)."""
    return list(iter_documents(cfg))


def iter_documents(cfg: DataConfig, report: ReadReport | None = None) -> Iterator[str]:
    """The non-empty documents of the configured source, in a deterministic order, at most ``max_documents``."""
    readers: dict[str, Callable[[DataConfig, ReadReport], Iterator[str]]] = {
        "builtin": lambda _cfg, _r: iter(builtin_documents()),
        "text": _text_documents,
        "jsonl": _jsonl_documents,
        "parquet": _parquet_documents,
        "hf": lambda c, _r: _hf_documents(c),
    }
    limit = cfg.max_documents
    n = 0
    for doc in readers[cfg.source](cfg, report if report is not None else ReadReport()):
        if doc.strip():
            yield doc
            n += 1
            if limit is not None and n >= limit:
                return
    if n == 0:
        where = "the built-in corpus" if cfg.source == "builtin" else repr(cfg.path)
        raise DataError(
            f"empty corpus: {where} (data.source={cfg.source!r}) has no non-empty documents; "
            "point data.path at files that contain text"
            + (f" in field {cfg.text_field!r}" if cfg.source in ("jsonl", "parquet", "hf") else "")
        )


def source_files(cfg: DataConfig) -> list[Path]:
    """The local files the corpus is read from (absolute, sorted), for the cache key.

    Empty for a hub dataset (its name, config and split identify it). Raises the same
    :class:`DataError` as :func:`load_documents` for a missing path.
    """
    if cfg.source == "builtin":
        import pydoc_data.topics

        return [Path(pydoc_data.topics.__file__).resolve()]
    if cfg.source == "text":
        return _files(cfg, "txt")
    if cfg.source == "jsonl":
        return _files(cfg, "jsonl")
    if cfg.source == "parquet":
        return _files(cfg, "parquet")
    local = _local_hf_path(cfg)
    if local is None:
        return []
    if local.is_file():
        return [local.resolve()]
    return sorted(p.resolve() for p in local.rglob("*") if p.is_file() and not _hidden(p, local))


# ----------------------------------------------------------------------------- builtin


def builtin_documents() -> list[str]:
    """The built-in prose corpus (see the module docstring for how it is cut)."""
    import pydoc_data.topics

    topics: dict[str, str] = pydoc_data.topics.topics
    docs: list[str] = []
    for key in sorted(topics):
        for para in _BLANK_LINES.split(topics[key]):
            lines = [ln.strip() for ln in para.splitlines() if ln.strip() and not _RST_UNDERLINE.match(ln)]
            text = " ".join(lines)
            if _looks_like_prose(text):
                docs.append(text)
    return docs


def _looks_like_prose(text: str) -> bool:
    """Keep sentences, drop code, grammar and headings: the corpus should read as English."""
    if len(text.split()) < _MIN_PROSE_WORDS or "::=" in text or ">>>" in text:
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters >= _MIN_PROSE_LETTER_SHARE * len(text)


# ----------------------------------------------------------------------------- local files


_GLOB_CHARS = re.compile(r"[*?\[]")


def _files(cfg: DataConfig, ext: str) -> list[Path]:
    """The ``*.ext`` files under ``cfg.path`` (a file, a folder searched recursively, or a glob), sorted."""
    assert cfg.path is not None  # DataConfig enforces it for non-builtin sources
    if _GLOB_CHARS.search(cfg.path):
        pattern = str(Path(cfg.path).expanduser())
        matched = sorted(Path(p).resolve() for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matched:
            raise DataError(
                f"data.path glob {cfg.path!r} matches no files (data.source={cfg.source!r}); check the pattern "
                f"(e.g. 'shards/*.{ext}', or 'data/**/*.{ext}' for sub-folders)"
            )
        return matched
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataError(
            f"data.path {str(root)!r} does not exist (data.source={cfg.source!r}); "
            f"set data.path to a .{ext} file, a folder of .{ext} files or a glob"
        )
    if root.is_file():
        return [root.resolve()]
    found = sorted(
        (p for p in root.rglob(f"*.{ext}") if p.is_file() and not _hidden(p, root)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not found:
        raise DataError(
            f"no .{ext} files in folder {str(root)!r} (data.source={cfg.source!r}); "
            f"add .{ext} files there or set data.path to one file"
        )
    return [p.resolve() for p in found]


def _hidden(path: Path, root: Path) -> bool:
    """True for files inside dot-folders (.git, .cache) or dot-files, which are never data."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _utf8_lines(path: Path, cfg: DataConfig, report: ReadReport) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of ``path``, decoded one line at a time (bounded memory).

    A line that is not UTF-8 is an error naming the file and line, or skipped and counted
    with ``data.bad_records: skip``. Newlines are normalised as ``open()`` does (``\\r\\n`` -> ``\\n``).
    """
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{str(path)!r} line {lineno}"
                if cfg.bad_records == "skip":
                    report.skip(f"{where}: not UTF-8")
                    continue
                raise DataError(
                    f"{where} is not valid UTF-8 (byte {e.start} of the line: {e.reason}); convert the file "
                    "to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or set data.bad_records: skip"
                ) from e
            if "\r" in line:
                line = line.replace("\r\n", "\n").replace("\r", "\n")
            yield lineno, line


def _text_documents(cfg: DataConfig, report: ReadReport) -> Iterator[str]:
    for path in _files(cfg, "txt"):
        yield from _stream_text(line for _, line in _utf8_lines(path, cfg, report))


def _stream_text(lines: Iterable[str]) -> Iterator[str]:
    """:func:`split_text` over a stream of lines (each ending with its newline), one document at a time."""
    it = iter(lines)
    head: list[str] = []
    first = ""
    for ln in it:
        head.append(ln)
        if ln.strip():
            first = ln.splitlines()[0] if ln.splitlines() else ln
            break
    rest = itertools.chain(head, it)
    if _is_wikitext_title(first):
        yield from _wikitext_articles(sub for ln in rest for sub in ln.splitlines())
        return
    para: list[str] = []
    for ln in rest:
        if ln.strip(" \t\r\f\v\n") == "" and ln.endswith("\n"):  # a blank line ends a paragraph
            if para:
                doc = "".join(para).strip()
                if doc:
                    yield doc
                para = []
        else:
            para.append(ln)
    doc = "".join(para).strip()
    if doc:
        yield doc


def split_text(text: str) -> list[str]:
    """Cut one text file into documents: WikiText articles or blank-line paragraphs."""
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if _is_wikitext_title(first):
        return list(_wikitext_articles(lines))
    return [p.strip() for p in _BLANK_LINES.split(text) if p.strip()]


def _wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines into articles: a `` = Title = `` line starts one; blank lines dropped."""
    current: list[str] = []
    for ln in lines:
        if _is_wikitext_title(ln) and current:
            yield "\n".join(current)
            current = []
        if ln.strip():
            current.append(ln.strip())
    if current:
        yield "\n".join(current)


def _is_wikitext_title(line: str) -> bool:
    """`` = Title = `` (top level), not `` = = Section = = ``."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def _jsonl_documents(cfg: DataConfig, report: ReadReport) -> Iterator[str]:
    field_name = cfg.text_field
    skip = cfg.bad_records == "skip"
    for path in _files(cfg, "jsonl"):
        for lineno, line in _utf8_lines(path, cfg, report):
            if not line.strip():
                continue
            where = f"{str(path)!r} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if skip:
                    report.skip(f"{where}: not JSON")
                    continue
                raise DataError(
                    f"{where} is not valid JSON ({e.msg}, column {e.colno}); "
                    f'each line must be one JSON object such as {{"{field_name}": "..."}} '
                    "(or set data.bad_records: skip)"
                ) from e
            if not isinstance(record, dict):
                if skip:
                    report.skip(f"{where}: not a JSON object")
                    continue
                raise DataError(
                    f"{where} is a JSON {type(record).__name__}, not an object; "
                    f'each line must be one JSON object such as {{"{field_name}": "..."}}'
                )
            yield _text_value(record.get(field_name, _MISSING), field_name, where, record)


_MISSING: Any = object()


def _text_value(value: Any, field: str, where: str, record: dict[str, Any]) -> str:
    if value is _MISSING:
        raise DataError(
            f"{where} has no field {field!r}; fields present: {sorted(record)}. "
            "Set data.text_field to the field that holds the text"
        )
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, not a string; "
                        "set data.text_field to a text field")
    return value


def _parquet_documents(cfg: DataConfig, _report: ReadReport) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    field = cfg.text_field
    for path in _files(cfg, "parquet"):
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{str(path)!r} is not a readable parquet file ({e}); check the file") from e
        names = pf.schema_arrow.names
        if field not in names:
            raise DataError(
                f"{str(path)!r} has no column {field!r}; columns present: {names}. "
                "Set data.text_field to the column that holds the text"
            )
        kind = pf.schema_arrow.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{str(path)!r}: column {field!r} has type {kind}, not string; "
                            "set data.text_field to a text column")
        row = 0
        batches = pf.iter_batches(columns=[field], batch_size=8192)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{str(path)!r} is corrupt or truncated after row {row} ({e}); "
                                "re-download or rewrite the file") from e
            for value in batch.column(0).to_pylist():
                yield value or ""
            row += batch.num_rows


# ----------------------------------------------------------------------------- Hugging Face


def _local_hf_path(cfg: DataConfig) -> Path | None:
    """The local dataset folder/file ``cfg.path`` names, or None for a hub name.

    A path that is clearly local (absolute, ``./``, ``../``, ``~``) but missing is an
    error here rather than a confusing hub lookup (which retries for ~25 s offline).
    """
    assert cfg.path is not None
    p = Path(cfg.path).expanduser()
    if p.exists():
        return p
    if cfg.path.startswith(("/", "./", "../", "~", ".\\")) or p.is_absolute():
        raise DataError(
            f"data.path {cfg.path!r} does not exist (data.source='hf'); set it to a local dataset folder "
            "(parquet/jsonl files or a save_to_disk folder) or to a hub dataset name such as 'wikitext'"
        )
    return None


#: packaged `datasets` builders for a single local data file given as data.path (its split is "train")
_HF_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}


def _is_saved_dataset(folder: Path) -> bool:
    """True for folders written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _hf_documents(cfg: DataConfig) -> Iterator[str]:
    import datasets

    assert cfg.path is not None
    local = _local_hf_path(cfg)
    what = f"Hugging Face dataset {cfg.path!r} (config {cfg.hf_config!r}, split {cfg.hf_split!r})"
    if local is not None and local.is_dir() and _is_saved_dataset(local):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.hf_split not in loaded:
                raise DataError(
                    f"{str(local)!r} (saved with save_to_disk) has no split {cfg.hf_split!r}; "
                    f"splits present: {sorted(loaded)}. Set data.hf_split to one of them"
                )
            ds = loaded[cfg.hf_split]
        else:
            ds = loaded
    else:
        args: tuple[str | None, ...] = (cfg.path, cfg.hf_config)
        # A hub dataset is streamed (no full download and Arrow conversion before the first document);
        # local files are converted to a memory-mapped Arrow cache by `datasets`, read in batches.
        kwargs: dict[str, Any] = {"split": cfg.hf_split, "streaming": local is None}
        if local is not None and local.is_file():  # one data file: use the matching packaged builder
            builder = _HF_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"data.path {cfg.path!r} is a file that datasets cannot read by itself; use a "
                                f"{'/'.join(sorted(_HF_FILE_BUILDERS))} file or a folder")
            args, kwargs["data_files"] = (builder, cfg.hf_config), str(local)
        try:
            ds = datasets.load_dataset(*args, **kwargs)
        except (datasets.exceptions.DatasetNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
            raise DataError(
                f"{what} was not found ({e}). Check data.path (a hub name such as 'wikitext' or a local "
                "folder of parquet/jsonl files); if this machine is offline, the hub could not be reached: "
                "set data.path to a local copy (e.g. a folder written by Dataset.save_to_disk)"
            ) from e
        except ConnectionError as e:
            raise DataError(
                f"could not load {what}: the Hugging Face hub could not be reached ({e}). On an offline "
                "machine, download it elsewhere (datasets.load_dataset(...).save_to_disk(DIR)), copy DIR "
                "here and set data.path to that local path, or use data.source 'text'/'jsonl'/'parquet'"
            ) from e
        except (ValueError, OSError) as e:
            raise DataError(
                f"could not load {what}: {str(e).rstrip('.')}. Check data.hf_config and data.hf_split; "
                "if the hub could not be reached, set data.path to a local dataset folder"
            ) from e
        if isinstance(ds, datasets.DatasetDict):  # only when a split expression returns several
            raise DataError(f"{what} returned several splits {sorted(ds)}; set data.hf_split to one of them")
    if ds.column_names is not None and cfg.text_field not in ds.column_names:
        raise DataError(
            f"{what} has no field {cfg.text_field!r}; fields present: {ds.column_names}. "
            "Set data.text_field to the field that holds the text"
        )
    feature = ds.features[cfg.text_field] if ds.features is not None else None
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{what}: field {cfg.text_field!r} is {feature}, not a string; "
                        "set data.text_field to a text field")
    rows: Iterator[str] = (value or "" for batch in ds.select_columns([cfg.text_field]).with_format(None).iter(batch_size=8192)
            for value in batch[cfg.text_field])
    head = list(itertools.islice(rows, 64))
    rows = itertools.chain(head, rows)
    if _is_wikitext_title(next((r for r in head if r.strip()), "")):
        yield from _wikitext_articles(rows)  # hub WikiText: one line per row; regroup into articles
    else:
        yield from rows
