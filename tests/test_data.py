"""Data sources, split + packing + cache, and the train/eval batch iterators.

Everything runs on files the tests write; no network, no /work/shared data.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from difflm.data import (
    DataConfig,
    DataError,
    TokenizerConfig,
    iterate_train_batches,
    load_documents,
    load_prepared,
    prepare_data,
)
from difflm.data import pipeline, tokenization
from difflm.data.pipeline import split_documents, token_stream
from difflm.data.tokenization import ByteTokenizer


def _quiet(_: str) -> None:
    pass


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep `datasets`' build cache inside the test's tmp dir and its progress bars off."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()


def _tagged_docs(n: int, words: int = 12) -> list[str]:
    """Documents that say which they are: 'doc0007 alpha beta ...'."""
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [f"doc{i:04d} " + " ".join(vocab[(i + j) % 10] for j in range(words)) for i in range(n)]


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    return path


# ----------------------------------------------------------------------------- sources


def test_builtin_corpus_is_real_english_prose() -> None:
    docs = load_documents(DataConfig())
    assert len(docs) > 1000
    text = " ".join(docs)
    assert len(text) > 250_000
    words = Counter(re.findall(r"[a-z]+", text.lower()))
    for w in ("the", "of", "and", "is", "to", "in", "a"):
        assert words[w] > 300, w
    assert words.most_common(1)[0][0] == "the"
    assert sum(c.isascii() and (c.isalpha() or c == " ") for c in text) / len(text) > 0.85
    assert all(len(d.split()) >= 8 and "::=" not in d and ">>>" not in d for d in docs)
    assert load_documents(DataConfig()) == docs  # deterministic
    assert load_documents(DataConfig(max_documents=10)) == docs[:10]


def test_text_file_splits_at_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("First para\nline two.\n\n  \n\nSecond para.\n\n\n   Third.  \n")
    assert load_documents(DataConfig(source="text", path=str(f))) == ["First para\nline two.", "Second para.",
                                                                      "Third."]


def test_text_file_wikitext_style_splits_per_article(tmp_path: Path) -> None:
    f = tmp_path / "wiki.txt"
    f.write_text(" \n = Lobster = \n \n Lobsters are animals . \n \n = = Description = = \n \n They are blue . \n"
                 " \n = Robert Boulter = \n \n Robert is an actor . \n")
    assert load_documents(DataConfig(source="text", path=str(f))) == [
        "= Lobster =\nLobsters are animals .\n= = Description = =\nThey are blue .",
        "= Robert Boulter =\nRobert is an actor .",
    ]


def test_text_folder_reads_txt_files_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("from b")
    (tmp_path / "a.txt").write_text("from a 1\n\nfrom a 2")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("from sub/c")
    (tmp_path / "notes.md").write_text("not text data")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    cfg = DataConfig(source="text", path=str(tmp_path))
    assert load_documents(cfg) == ["from a 1", "from a 2", "from b", "from sub/c"]
    assert load_documents(cfg.model_copy(update={"max_documents": 3})) == ["from a 1", "from a 2", "from b"]


def test_jsonl_source(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "one"}\n\n{"text": null}\n{"text": "  "}\n{"text": "two", "x": 1}\n')
    assert load_documents(DataConfig(source="jsonl", path=str(f))) == ["one", "two"]
    g = tmp_path / "b.jsonl"
    g.write_text('{"body": "other field"}\n')
    assert load_documents(DataConfig(source="jsonl", path=str(g), text_field="body")) == ["other field"]


def test_parquet_source(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": ["alpha", "", None, "beta"]}), tmp_path / "d.parquet")
    assert load_documents(DataConfig(source="parquet", path=str(tmp_path / "d.parquet"))) == ["alpha", "beta"]
    pq.write_table(pa.table({"text": ["gamma"]}), tmp_path / "e.parquet")
    assert load_documents(DataConfig(source="parquet", path=str(tmp_path))) == ["alpha", "beta", "gamma"]


def test_hf_source_from_local_parquet_and_jsonl_folders(tmp_path: Path, hf_cache: None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    table = pa.table({"text": ["first doc", "", "second doc"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "pq" / "train.parquet")
    assert load_documents(DataConfig(source="hf", path=str(tmp_path / "pq"))) == ["first doc", "second doc"]
    (tmp_path / "js").mkdir()
    _write_jsonl(tmp_path / "js" / "train.jsonl", ["j1", "j2", "j3"])
    assert load_documents(DataConfig(source="hf", path=str(tmp_path / "js"), max_documents=2)) == ["j1", "j2"]
    one_file = DataConfig(source="hf", path=str(tmp_path / "js" / "train.jsonl"))  # a single local file
    assert load_documents(one_file) == ["j1", "j2", "j3"]


def test_hf_wikitext_rows_are_regrouped_into_articles(tmp_path: Path, hf_cache: None) -> None:
    import datasets

    rows = ["", " = Lobster = \n", "", " Lobsters are animals . \n", " = = Description = = \n", " Blue . \n",
            "", " = Robert = \n", " An actor . \n"]  # the layout of the hub's wikitext-2-raw-v1
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "wt"))
    assert load_documents(DataConfig(source="hf", path=str(tmp_path / "wt"))) == [
        "= Lobster =\nLobsters are animals .\n= = Description = =\nBlue .", "= Robert =\nAn actor ."]


def test_hf_source_from_save_to_disk(tmp_path: Path, hf_cache: None) -> None:
    import datasets

    saved = datasets.Dataset.from_dict({"text": ["s1", "s2"], "y": [0, 1]}).with_format("numpy")
    saved.save_to_disk(str(tmp_path / "ds"))  # a saved format must not leak numpy strings into documents
    docs = load_documents(DataConfig(source="hf", path=str(tmp_path / "ds")))
    assert docs == ["s1", "s2"] and all(type(d) is str for d in docs)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
        "validation": datasets.Dataset.from_dict({"text": ["v1"]}),
    }).save_to_disk(str(tmp_path / "dd"))
    assert load_documents(DataConfig(source="hf", path=str(tmp_path / "dd"))) == ["t1", "t2"]
    assert load_documents(DataConfig(source="hf", path=str(tmp_path / "dd"), hf_split="validation")) == ["v1"]
    with pytest.raises(DataError, match=r"no split 'test'; splits present: \['train', 'validation'\]"):
        load_documents(DataConfig(source="hf", path=str(tmp_path / "dd"), hf_split="test"))
    with pytest.raises(DataError, match=r"no field 'body'; fields present: \['text', 'y'\]"):
        load_documents(DataConfig(source="hf", path=str(tmp_path / "ds"), text_field="body"))


# ----------------------------------------------------------------------------- source errors


def test_missing_file_error_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=re.escape(f"data.path {str(missing)!r} does not exist")):
        load_documents(DataConfig(source="text", path=str(missing)))


def test_folder_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"no \.txt files in folder"):
        load_documents(DataConfig(source="text", path=str(tmp_path)))


def test_jsonl_bad_line_reports_line_number(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"line 3 is not valid JSON"):
        load_documents(DataConfig(source="jsonl", path=str(f)))
    f.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(DataError, match=r"line 2 is a JSON list, not an object"):
        load_documents(DataConfig(source="jsonl", path=str(f)))


def test_jsonl_missing_field_lists_fields(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "x", "id": 1}\n')
    with pytest.raises(DataError, match=r"line 1 has no field 'text'; fields present: \['body', 'id'\]"):
        load_documents(DataConfig(source="jsonl", path=str(f)))


def test_parquet_missing_column_lists_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"], "id": [1]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"no column 'text'; columns present: \['content', 'id'\]"):
        load_documents(DataConfig(source="parquet", path=str(tmp_path / "d.parquet")))


def test_empty_corpus(tmp_path: Path) -> None:
    f = tmp_path / "blank.txt"
    f.write_text("\n   \n\n")
    with pytest.raises(DataError, match="empty corpus"):
        load_documents(DataConfig(source="text", path=str(f)))


def test_non_utf8_file(tmp_path: Path) -> None:
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_documents(DataConfig(source="text", path=str(f)))


def test_hf_unreachable_hub_suggests_local_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = DataConfig(source="hf", path="wikitext", hf_config="wikitext-2-raw-v1")
    with pytest.raises(DataError, match=r"(?s)'wikitext'.*hub could not be reached.*data\.path to that local path"):
        load_documents(cfg)


def test_hf_dataset_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def missing(*args: object, **kwargs: object) -> None:
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match=r"(?s)'nobody/nothing'.*was not found.*hub could not be reached"):
        load_documents(DataConfig(source="hf", path="nobody/nothing"))


def test_hf_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_documents(DataConfig(source="hf", path=str(tmp_path / "absent")))


# ----------------------------------------------------------------------------- split + packing


def test_split_is_by_document_deterministic_and_disjoint() -> None:
    docs = _tagged_docs(2000)
    train, val = split_documents(docs, 0.1, seed=3)
    assert 160 <= len(val) <= 240 and len(train) + len(val) == 2000  # 10% in expectation (sd ~13)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(docs)
    assert train == sorted(train) and val == sorted(val)  # corpus order kept (tags sort like the corpus)
    assert split_documents(docs, 0.1, seed=3) == (train, val)
    assert split_documents(docs, 0.1, seed=4)[1] != val
    # decided per document: a prefix of the corpus splits exactly like the start of the whole
    assert split_documents(docs[:500], 0.1, seed=3)[1] == [d for d in val if d < docs[500]]
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(docs[:1], 0.1, seed=0)


def _prepare_tagged(tmp_path: Path, n: int = 200, seq_len: int = 32, **kw: object):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data_file = _write_jsonl(tmp_path / "docs.jsonl", _tagged_docs(n))
    cfg = DataConfig(source="jsonl", path=str(data_file), seq_len=seq_len, val_fraction=0.1, split_seed=7,
                     cache_dir=str(tmp_path / "cache"), **kw)
    return cfg, prepare_data(cfg, TokenizerConfig(kind="byte"), log=_quiet)


def test_packing_blocks_shape_bos_eos_and_content(tmp_path: Path) -> None:
    cfg, p = _prepare_tagged(tmp_path)
    tok = p.tokenizer
    for blocks in (p.train, p.val):
        assert blocks.dtype == np.uint16 and blocks.ndim == 2 and blocks.shape[1] == 32
        assert (blocks[:, 0] == tok.bos_id).all() and (blocks[:, -1] == tok.eos_id).all()
        assert not np.isin(blocks[:, 1:-1], [tok.bos_id, tok.pad_id]).any()
    # The block interiors are exactly the split's EOS-separated token stream, remainder dropped.
    train_docs, val_docs = split_documents(load_documents(cfg), 0.1, 7)
    for blocks, docs, name in ((p.train, train_docs, "train"), (p.val, val_docs, "val")):
        stream = token_stream(docs, tok)
        assert p.stats[f"{name}_tokens"] == len(stream) == sum(len(d) + 1 for d in docs)
        assert p.stats[f"{name}_blocks"] == len(blocks) == len(stream) // 30
        np.testing.assert_array_equal(blocks[:, 1:-1].ravel(), stream[: len(blocks) * 30])
    assert p.stats["train_documents"] + p.stats["val_documents"] == 200 and p.stats["val_documents"] == len(val_docs)
    assert p.stats["from_cache"] is False and p.seq_len == 32 and p.vocab_size == 259


def test_packed_splits_hold_disjoint_documents(tmp_path: Path) -> None:
    _, p = _prepare_tagged(tmp_path)
    tags = {name: set(re.findall(r"doc\d{4}", p.tokenizer.decode(blocks[:, 1:-1].ravel())))
            for name, blocks in (("train", p.train), ("val", p.val))}
    assert len(tags["val"]) >= 15 and len(tags["train"]) >= 170
    assert tags["train"].isdisjoint(tags["val"])


def test_prepare_is_deterministic_across_cache_dirs(tmp_path: Path) -> None:
    _, a = _prepare_tagged(tmp_path / "a")
    _, b = _prepare_tagged(tmp_path / "b")
    assert a.stats["from_cache"] is False and b.stats["from_cache"] is False
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)


def test_second_prepare_is_a_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    cfg, first = _prepare_tagged(tmp_path)
    first = prepare_data(cfg, TokenizerConfig(kind="byte"), log=lines.append)
    assert first.stats["from_cache"] is True  # the helper call above built it

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache hit must not read or tokenize documents")

    monkeypatch.setattr(pipeline, "iter_documents", must_not_run)
    monkeypatch.setattr(pipeline, "tokenize_chunk", must_not_run)
    again = prepare_data(cfg, TokenizerConfig(kind="byte"), log=lines.append)
    assert again.stats["from_cache"] is True and again.cache_dir == first.cache_dir
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.val, first.val)
    assert all("cache hit" in ln for ln in lines)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert entries == sorted([again.cache_dir.name, "tokens"])  # no leftover temp folders
    assert sorted(p.name for p in again.cache_dir.iterdir()) == ["meta.json", "tokenizer", "train.npy", "val.npy"]


def test_cache_logs_and_worker_reload(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = DataConfig(max_documents=200, seq_len=64, cache_dir=str(tmp_path))
    p = prepare_data(cfg, TokenizerConfig(kind="byte"), log=lines.append)
    assert any("tokenized 200 documents" in ln for ln in lines)
    assert any(f"cached at {p.cache_dir}" in ln for ln in lines)
    worker = load_prepared(p.cache_dir)  # what another process does
    np.testing.assert_array_equal(worker.train, p.train)
    assert worker.tokenizer.vocab_size == 259 and worker.stats["from_cache"] is True
    with pytest.raises(DataError, match="run prepare_data .* first"):
        load_prepared(tmp_path / "nothing")


def test_cache_key_follows_config_and_file_changes(tmp_path: Path) -> None:
    cfg, a = _prepare_tagged(tmp_path)
    b = prepare_data(cfg.model_copy(update={"seq_len": 48}), TokenizerConfig(kind="byte"), log=_quiet)
    assert b.cache_dir != a.cache_dir and b.train.shape[1] == 48
    c = prepare_data(cfg.model_copy(update={"split_seed": 8}), TokenizerConfig(kind="byte"), log=_quiet)
    assert c.cache_dir != a.cache_dir and c.stats["from_cache"] is False
    _write_jsonl(Path(cfg.path or ""), _tagged_docs(220))  # the source file changes: new entry
    d = prepare_data(cfg, TokenizerConfig(kind="byte"), log=_quiet)
    assert d.stats["from_cache"] is False and d.stats["train_documents"] + d.stats["val_documents"] == 220


def test_concurrent_writer_race_keeps_the_first_entry(tmp_path: Path) -> None:
    cfg, p = _prepare_tagged(tmp_path)
    index = pipeline.read_index(p.stats["tokens_dir"])
    # A second process that finished packing later: its rename fails, the existing entry wins.
    out = pipeline._pack_entry(p.cache_dir.parent, p.cache_dir.name, Path(p.stats["tokens_dir"]), index, cfg)
    assert out == p.cache_dir
    assert len(load_prepared(out).train) == len(p.train)
    assert sorted(q.name for q in out.parent.iterdir()) == sorted([out.name, "tokens"])


def test_corpus_too_small_for_seq_len(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"(?s)corpus too small for seq_len 512.*validation.*lower data\.seq_len"
                                        r".*raise data\.val_fraction"):
        _prepare_tagged(tmp_path, n=40, seq_len=512)


def test_bpe_prepare_trains_on_train_split_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = tokenization.train_bpe

    def counting(docs: list[str], vocab_size: int):  # -> HFTokenizer
        calls.append(len(docs))
        return real(docs, vocab_size)

    monkeypatch.setattr(tokenization, "train_bpe", counting)
    cfg = DataConfig(max_documents=300, seq_len=64, cache_dir=str(tmp_path))
    tok = TokenizerConfig(kind="bpe", vocab_size=512)
    p = prepare_data(cfg, tok, log=_quiet)
    assert calls == [p.stats["train_documents"]] and 270 <= calls[0] < 300  # the train split only
    assert p.tokenizer.vocab_size == 512 and int(p.train.max()) < 512
    assert (p.train[:, 0] == p.tokenizer.bos_id).all() and (p.val[:, -1] == p.tokenizer.eos_id).all()
    q = prepare_data(cfg.model_copy(update={"seq_len": 96}), tok, log=_quiet)  # new entry, same tokenizer
    assert q.stats["from_cache"] is False and calls == calls[:1]
    assert load_prepared(p.cache_dir).tokenizer.encode("the value") == p.tokenizer.encode("the value")
    # a bounded sample: the first train documents up to train_sample_bytes
    small = tok.model_copy(update={"train_sample_bytes": 20_000})
    r = prepare_data(cfg, small, log=_quiet)
    assert len(calls) == 2 and 40 < calls[1] < 150 and r.stats["train_documents"] == p.stats["train_documents"]


# ----------------------------------------------------------------------------- batching


def _rows(n: int, seq_len: int = 4) -> np.ndarray:
    """Row i is filled with i, so a batch tells which rows it holds."""
    return np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_batches_shard_disjointly_within_an_epoch(world_size: int) -> None:
    blocks, bs = _rows(50), 4
    per_epoch = 50 // (bs * world_size)
    epochs: list[list[set[int]]] = [[], []]
    for rank in range(world_size):
        it = iterate_train_batches(blocks, bs, rank=rank, world_size=world_size, seed=11)
        for e in range(2):
            rows: set[int] = set()
            for _ in range(per_epoch):
                b = next(it)
                assert b.shape == (bs, 4) and b.dtype == np.int64
                assert (b == b[:, :1]).all()
                rows |= set(b[:, 0].tolist())
            assert len(rows) == per_epoch * bs  # no repeats within an epoch on a rank
            epochs[e].append(rows)
    for shards in epochs:
        assert sum(len(s) for s in shards) == len(set().union(*shards)) == per_epoch * bs * world_size
    if world_size > 1:
        assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_train_batches_are_seeded_and_resumable() -> None:
    blocks = _rows(40)

    def take(k: int, **kw: int) -> list[list[int]]:
        it = iterate_train_batches(blocks, 4, rank=1, world_size=2, **kw)
        return [next(it)[:, 0].tolist() for _ in range(k)]

    assert take(12, seed=0) == take(12, seed=0)
    assert take(12, seed=0) != take(12, seed=1)
    assert take(12, seed=0)[7:] == take(5, seed=0, start_batch=7)  # 7 = 1 epoch (5) + 2 batches


def test_train_batches_need_enough_blocks() -> None:
    with pytest.raises(ValueError, match=r"has 7 blocks, fewer than batch_size \* world_size = 4 \* 2 = 8"):
        next(iterate_train_batches(_rows(7), 4, rank=0, world_size=2, seed=0))
    with pytest.raises(ValueError, match="rank < world_size"):
        next(iterate_train_batches(_rows(7), 4, rank=2, world_size=2, seed=0))


def test_batches_from_memory_mapped_cache(tmp_path: Path) -> None:
    _, p = _prepare_tagged(tmp_path)
    worker = load_prepared(p.cache_dir)
    assert isinstance(worker.train, np.memmap) or worker.train.base is not None
    b = next(iterate_train_batches(worker.train, 8, rank=0, world_size=1, seed=0))
    assert b.shape == (8, 32) and b.dtype == np.int64 and (b[:, 0] == 256).all()
    assert os.path.samefile(worker.cache_dir, p.cache_dir)
