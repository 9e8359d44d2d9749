"""Streaming, bounded-memory, resumable data preparation: token shards, hash split, packing per seq_len.

Generated corpora only (no network, no /work/shared data); each test well under a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from difflm.data import DataConfig, DataError, TokenizerConfig, load_prepared, prepare_data
from difflm.data import pipeline
from difflm.data.pipeline import describe_cache, read_index
from difflm.data.shards import token_dtype

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _quiet(_: str) -> None:
    pass


def _write_text(path: Path, n_docs: int, words: int = 40) -> Path:
    """n_docs blank-line-separated paragraphs that name their index."""
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(f"doc{i:06d} " + " ".join(WORDS[(i * 7 + j) % 12] for j in range(words)) + "\n\n")
    return path


def _cfg(path: Path, cache: Path, **kw: object) -> DataConfig:
    base: dict[str, object] = dict(source="text", path=str(path), seq_len=64, val_fraction=0.1, split_seed=5,
                                   cache_dir=str(cache), chunk_chars=20_000, num_proc=1)
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


def _shard_bytes(tokens_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tokens_dir)): p.read_bytes()
            for p in sorted(tokens_dir.rglob("*")) if p.suffix in (".bin", ".json") and p.name != "index.json"}


def test_token_dtype_follows_the_vocab() -> None:
    assert token_dtype(259) == token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_split_and_blocks_identical_across_chunk_sizes_and_worker_counts(tmp_path: Path) -> None:
    src = _write_text(tmp_path / "c.txt", 600)
    tok = TokenizerConfig(kind="byte")
    a = prepare_data(_cfg(src, tmp_path / "a", chunk_chars=5_000, num_proc=1), tok, log=_quiet)
    b = prepare_data(_cfg(src, tmp_path / "b", chunk_chars=47_000, num_proc=2), tok, log=_quiet)
    assert len(read_index(a.stats["tokens_dir"])["chunks"]) > 20 and len(read_index(b.stats["tokens_dir"])["chunks"]) == 3
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert a.stats["val_documents"] == b.stats["val_documents"] and 35 <= a.stats["val_documents"] <= 85
    # val documents are the hashed ones: decoded val text holds exactly the val tags
    from difflm.data.split import val_mask

    want = {f"doc{i:06d}" for i in np.flatnonzero(val_mask(0, 600, 0.1, 5))}
    import re

    got = set(re.findall(r"doc\d{6}", a.tokenizer.decode(np.asarray(a.val).ravel().tolist())))
    assert got <= want and len(got) >= len(want) - 2  # the last partial block is dropped


def test_seq_len_change_repacks_without_tokenizing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_text(tmp_path / "c.txt", 300)
    cfg, tok = _cfg(src, tmp_path / "cache"), TokenizerConfig(kind="byte")
    a = prepare_data(cfg, tok, log=_quiet)

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("another seq_len or val cap must not re-read or re-tokenize")

    monkeypatch.setattr(pipeline, "tokenize_chunk", must_not_run)
    monkeypatch.setattr(pipeline, "iter_documents", must_not_run)
    lines: list[str] = []
    b = prepare_data(cfg.model_copy(update={"seq_len": 100, "val_tokens": 200}), tok, log=lines.append)
    assert b.cache_dir != a.cache_dir and b.stats["tokens_dir"] == a.stats["tokens_dir"]
    assert any("reusing the tokens" in ln for ln in lines)
    # the same token streams, cut at another length; the val cap keeps the first 200 // 98 blocks
    np.testing.assert_array_equal(a.train[:, 1:-1].ravel()[: 98 * 50], b.train[:, 1:-1].ravel()[: 98 * 50])
    assert len(b.val) == 2 and len(a.val) > 2
    np.testing.assert_array_equal(a.val[:, 1:-1].ravel()[:196], b.val[:, 1:-1].ravel())


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from difflm.data import DataConfig, TokenizerConfig, prepare_data
    seen = []
    def progress(p):
        seen.append(p)
        if len(seen) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # dies mid-way, as a killed job would
    cfg = DataConfig(source="text", path=sys.argv[1], seq_len=64, val_fraction=0.1, split_seed=5,
                     cache_dir=sys.argv[2], chunk_chars=20_000, num_proc=1)
    prepare_data(cfg, TokenizerConfig(kind="bpe", vocab_size=400), log=lambda m: None, progress=progress)
""")


def test_resume_after_kill_gives_identical_shards_and_partial_is_never_used(tmp_path: Path) -> None:
    src = _write_text(tmp_path / "c.txt", 1500)
    tok = TokenizerConfig(kind="bpe", vocab_size=400)
    cfg = _cfg(src, tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(src), cfg.cache_dir, "4"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    tdir = Path(cfg.cache_dir) / "tokens" / pipeline.tokens_key(cfg, tok)
    partial = describe_cache(tdir)
    assert partial["complete"] is False and partial["chunks_done"] == 4
    with pytest.raises(DataError, match="not a complete token cache"):
        read_index(tdir)
    assert not any(p.name.endswith(".npy") for p in Path(cfg.cache_dir).rglob("*"))  # no packed entry
    lines: list[str] = []
    resumed = prepare_data(cfg, tok, log=lines.append)
    assert any("resuming" in ln and "4 chunks were finished" in ln for ln in lines)
    fresh = prepare_data(_cfg(src, tmp_path / "fresh"), tok, log=_quiet)
    a, b = _shard_bytes(tdir), _shard_bytes(Path(fresh.stats["tokens_dir"]))
    assert len(a) > 2 * 8 and a == b  # every shard and chunk record byte-identical
    np.testing.assert_array_equal(resumed.train, fresh.train)


_MEASURE = textwrap.dedent("""
    import re, sys
    import numpy, difflm.data.pipeline, difflm.data.sources  # imports are not the preparation's memory
    from difflm.data import DataConfig, TokenizerConfig, prepare_data
    cfg = DataConfig(source="text", path=sys.argv[1], seq_len=128, cache_dir=sys.argv[2],
                     chunk_chars=200_000, num_proc=1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    p = prepare_data(cfg, TokenizerConfig(kind="byte"), log=lambda m: None)
    status = open("/proc/self/status").read()
    print(re.search(r"VmHWM:\\s+(\\d+)", status).group(1), p.stats["train_tokens"])
""")


def test_peak_memory_stays_flat_as_the_corpus_grows(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    peaks, tokens = [], []
    for n in (15_000, 60_000):  # ~4 MB and ~16 MB of text
        src = _write_text(tmp_path / f"c{n}.txt", n, words=40)
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path / f"cache{n}")], env=env,
                             capture_output=True, text=True, timeout=120, check=True).stdout.split()
        peaks.append(int(out[0]) / 1024)  # MB
        tokens.append(int(out[1]))
    assert tokens[1] > 3.9 * tokens[0]
    # an in-memory pipeline grows with the 12 MB of extra text (the old one ~6.6x it); streaming does not
    assert peaks[1] - peaks[0] < 5, peaks  # measured: +0.0 MB; holding the documents alone: +13 MB


def test_bad_input_names_file_and_line_or_counts_skips(tmp_path: Path) -> None:
    tok = TokenizerConfig(kind="byte")
    with pytest.raises(DataError, match=r"glob '.*nothing-\*\.jsonl' matches no files"):
        prepare_data(DataConfig(source="jsonl", path=str(tmp_path / "nothing-*.jsonl"), cache_dir=str(tmp_path)), tok)
    good = "".join(json.dumps({"text": f"document {i} " + "word " * 30}) + "\n" for i in range(60))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_text(good)
    (tmp_path / "shards" / "b.jsonl").write_bytes(good.encode() + b'{"text": "caf\xe9"}\n' + b"not json\n")
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "shards" / "*.jsonl"), seq_len=32, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"), num_proc=1)
    with pytest.raises(DataError, match=r"b\.jsonl' line 61 is not valid UTF-8"):
        prepare_data(cfg, tok, log=_quiet)
    tdirs = list((tmp_path / "cache" / "tokens").iterdir())
    assert tdirs and not (tdirs[0] / "index.json").exists()  # the failed run left nothing a later run trusts
    lines: list[str] = []
    p = prepare_data(cfg.model_copy(update={"bad_records": "skip"}), tok, log=lines.append)
    assert p.stats["skipped_records"] == 2 and p.stats["train_documents"] + p.stats["val_documents"] == 120
    assert any("skipped 2 bad records" in ln and "line 62: not JSON" in ln for ln in lines)


def test_truncated_parquet_names_the_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(2000)]}), f, row_group_size=500)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DataError, match=r"t\.parquet' is not a readable parquet file"):
        prepare_data(DataConfig(source="parquet", path=str(f), cache_dir=str(tmp_path / "c"), num_proc=1),
                     TokenizerConfig(kind="byte"), log=_quiet)


def test_cli_prepare_then_info(tmp_path: Path) -> None:
    from orchestrator.cli import main

    src = _write_text(tmp_path / "c.txt", 200)
    spec = tmp_path / "run.yaml"
    spec.write_text(f"model: {{family: mdlm, size: tiny}}\ndata: {{source: text, path: {src}, seq_len: 64, "
                    f"cache_dir: {tmp_path / 'cache'}, num_proc: 1}}\n")
    runner = CliRunner()
    out = runner.invoke(main, ["data", "prepare", str(spec)])
    assert out.exit_code == 0, out.output
    entry = Path(out.stdout.strip().splitlines()[-1])
    assert load_prepared(entry).stats["train_documents"] > 150
    info = runner.invoke(main, ["data", "info", str(spec), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["path"] == str(entry)
    again = runner.invoke(main, ["data", "prepare", str(spec)])
    assert "cache hit" in again.output
    bad = runner.invoke(main, ["data", "prepare", str(spec), "--set", "data.path=/nonexistent/x.txt"])
    assert bad.exit_code == 2 and "does not exist" in bad.output


@pytest.mark.slow
def test_ray_data_preparation_gives_the_local_shards(tmp_path: Path) -> None:
    """Ray Data tasks (a single local Ray instance here; the 2-node run is in docs/data.md) write the same bytes."""
    import ray

    from orchestrator.data.ray_runner import ray_data_runner

    src = _write_text(tmp_path / "c.txt", 800)
    tok = TokenizerConfig(kind="bpe", vocab_size=400)
    local = prepare_data(_cfg(src, tmp_path / "local"), tok, log=_quiet)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        lines: list[str] = []
        remote = prepare_data(_cfg(src, tmp_path / "ray"), tok, log=lines.append, runner=ray_data_runner(window=3))
    finally:
        ray.shutdown()
    a, b = _shard_bytes(Path(local.stats["tokens_dir"])), _shard_bytes(Path(remote.stats["tokens_dir"]))
    assert len(a) > 3 * 3 and a == b
    np.testing.assert_array_equal(local.train, remote.train)
    np.testing.assert_array_equal(local.val, remote.val)
