"""Read a corpus into a list of documents (plain strings), whatever its source.

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
    ``datasets.load_dataset(path, hf_config, split=hf_split)``, one document per
    non-empty row of ``text_field``. ``path`` may be a hub name (``wikitext``), a
    local folder that ``load_dataset`` reads (parquet/jsonl/csv files), a single
    local parquet/jsonl/json/csv/txt file (read with the matching packaged
    builder; its split is ``train``), or a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
    which is detected and read with ``load_from_disk``. Rows of WikiText-style data
    (hub ``wikitext``: one line per row, the first non-blank one a `` = Title = ``)
    are regrouped into articles exactly like a WikiText ``.txt`` file.

Every source drops documents that are empty after stripping, then keeps the first
``max_documents``. Problems raise :class:`DataError` saying what to fix.
"""

from __future__ import annotations

import json
import re
import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from difflm.data.config import DataConfig
from difflm.data.errors import DataError

__all__ = ["load_documents", "source_files", "builtin_documents"]

# RST heading underline/overline: a line made of one repeated punctuation character.
_RST_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_MIN_PROSE_WORDS = 8
_MIN_PROSE_LETTER_SHARE = 0.85


def load_documents(cfg: DataConfig) -> list[str]:
    """All documents of the configured source, in a deterministic order, at most ``max_documents``."""
    readers: dict[str, Callable[[DataConfig], Iterator[str]]] = {
        "builtin": lambda _cfg: iter(builtin_documents()),
        "text": _text_documents,
        "jsonl": _jsonl_documents,
        "parquet": _parquet_documents,
        "hf": _hf_documents,
    }
    limit = cfg.max_documents
    docs: list[str] = []
    for doc in readers[cfg.source](cfg):
        if doc.strip():
            docs.append(doc)
            if limit is not None and len(docs) >= limit:
                break
    if not docs:
        where = "the built-in corpus" if cfg.source == "builtin" else repr(cfg.path)
        raise DataError(
            f"empty corpus: {where} (data.source={cfg.source!r}) has no non-empty documents; "
            "point data.path at files that contain text"
            + (f" in field {cfg.text_field!r}" if cfg.source in ("jsonl", "parquet", "hf") else "")
        )
    return docs


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


def _files(cfg: DataConfig, ext: str) -> list[Path]:
    """The ``*.ext`` files under ``cfg.path`` (a file or a folder, recursive), sorted."""
    assert cfg.path is not None  # DataConfig enforces it for non-builtin sources
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataError(
            f"data.path {str(root)!r} does not exist (data.source={cfg.source!r}); "
            f"set data.path to a .{ext} file or a folder of .{ext} files"
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


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{str(path)!r} is not valid UTF-8 (byte {e.start}: {e.reason}); convert it to UTF-8, "
            "e.g. `iconv -f latin1 -t utf-8`"
        ) from e


def _text_documents(cfg: DataConfig) -> Iterator[str]:
    for path in _files(cfg, "txt"):
        yield from split_text(_read_utf8(path))


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


def _jsonl_documents(cfg: DataConfig) -> Iterator[str]:
    field = cfg.text_field
    for path in _files(cfg, "jsonl"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{str(path)!r} line {lineno} is not valid JSON ({e.msg}, column {e.colno}); "
                        f'each line must be one JSON object such as {{"{field}": "..."}}'
                    ) from e
                if not isinstance(record, dict):
                    raise DataError(
                        f"{str(path)!r} line {lineno} is a JSON {type(record).__name__}, not an object; "
                        f'each line must be one JSON object such as {{"{field}": "..."}}'
                    )
                yield _text_value(record.get(field, _MISSING), field, f"{str(path)!r} line {lineno}", record)


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


def _parquet_documents(cfg: DataConfig) -> Iterator[str]:
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
        for batch in pf.iter_batches(columns=[field], batch_size=8192):
            for value in batch.column(0).to_pylist():
                yield value or ""


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
        kwargs: dict[str, Any] = {"split": cfg.hf_split}
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
    if cfg.text_field not in ds.column_names:
        raise DataError(
            f"{what} has no field {cfg.text_field!r}; fields present: {ds.column_names}. "
            "Set data.text_field to the field that holds the text"
        )
    feature = ds.features[cfg.text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
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
