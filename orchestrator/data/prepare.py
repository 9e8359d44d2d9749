"""``difflm data prepare|info``: run a spec's data preparation alone, with progress; show what a cache holds.

The work is ``difflm.data.prepare_data`` (the same call ``difflm train`` and ``difflm sweep``
make, so what is prepared here is a cache hit there). This module adds the spec loading
(run specs and sweep files: a sweep's trials share its data settings), the progress bar on a
terminal (documents, tokens, MB/s, ETA; the periodic lines go to ``progress.log`` in the token
folder whatever the terminal), the choice of runner (local processes, or Ray Data across a
cluster with ``--address``) and the ``info`` report.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from difflm.data import DataConfig, TokenizerConfig
from difflm.data.pipeline import ChunkRunner, PreparedData, Progress, cache_key, describe_cache, prepare_data

__all__ = ["load_data_settings", "run_prepare", "cache_info", "format_info"]


def load_data_settings(spec_file: Path, overrides: tuple[str, ...]) -> tuple[DataConfig, TokenizerConfig]:
    """``data`` and ``tokenizer`` of a run spec or a sweep file (its base: every trial shares them)."""
    from orchestrator.spec.yamlio import read_yaml

    raw = read_yaml(spec_file)
    if "sweep" in raw:
        from orchestrator.sweep.spec import load_sweep_file

        sweep = load_sweep_file(str(spec_file), list(overrides))
        return sweep.data, sweep.tokenizer
    from orchestrator.spec.run import load_run_spec

    spec = load_run_spec(spec_file, list(overrides))
    return spec.data, spec.tokenizer


class _Bar:
    """A one-line progress display on a terminal (rich); nothing when stderr is not a terminal."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None

    def __call__(self, p: Progress) -> None:
        if not self.live:
            return
        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn

            self._progress = RichProgress(TextColumn("data"), BarColumn(), TextColumn("{task.description}"),
                                          console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("", total=p.total_bytes or None)
        self._progress.update(self._task, completed=p.chars, description=p.line())

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def run_prepare(data: DataConfig, tok: TokenizerConfig, *, address: str | None = None,
                log: Callable[[str], None] = print) -> PreparedData:
    """Prepare (or find) the cache entry of ``data`` + ``tok``; with ``address`` tokenize on that Ray cluster."""
    runner: ChunkRunner | None = None
    if address is not None:
        from orchestrator.cluster.session import init_ray
        from orchestrator.data.ray_runner import ray_data_runner

        init_ray(address)
        runner = ray_data_runner()
        log(f"data: tokenizing with Ray Data on the cluster at {address} (data.cache_dir must be shared)")
    bar = _Bar()
    try:
        return prepare_data(data, tok, log=log, progress=bar, runner=runner)
    finally:
        bar.close()


def cache_info(target: Path, overrides: tuple[str, ...]) -> dict[str, Any]:
    """What ``target`` (a spec file, or a cache folder) holds or would use."""
    if target.is_file():
        data, tok = load_data_settings(target, overrides)
        root = Path(data.cache_dir).expanduser().resolve()
        entry = root / cache_key(data, tok)
        if entry.is_dir():
            return describe_cache(entry)
        from difflm.data.pipeline import tokens_key

        tdir = root / "tokens" / tokens_key(data, tok)
        if tdir.is_dir():
            return {**describe_cache(tdir), "packed": f"not yet for seq_len {data.seq_len} ({entry.name})"}
        return {"kind": "none", "path": str(entry),
                "note": f"nothing prepared yet for this spec; run `difflm data prepare {target}`"}
    return describe_cache(target)


def format_info(info: dict[str, Any]) -> str:
    """The ``info`` report as text lines."""
    kind = info["kind"]
    if kind == "root":
        lines = [f"cache root {info['path']}: {len(info['entries'])} packed entries, {len(info['tokens'])} token folders"]
        lines += ["  " + format_info(e).replace("\n", "\n  ") for e in info["tokens"] + info["entries"]]
        return "\n".join(lines)
    if kind == "none":
        return f"{info['path']}: {info['note']}"
    if kind == "packed":
        return (f"packed entry {info['path']}\n"
                f"  seq_len {info['seq_len']}, vocab {info['vocab_size']} ({info.get('token_dtype', '?')}), "
                f"train {info['train_blocks']:,} blocks / {info['train_tokens']:,} tokens "
                f"({info['train_documents']:,} documents), val {info['val_blocks']:,} blocks / "
                f"{info['val_tokens']:,} tokens ({info['val_documents']:,} documents)\n"
                f"  skipped records {info.get('skipped_records', 0)}, {info['disk_bytes'] / 1e6:,.1f} MB on disk, "
                f"tokens from {info.get('tokens_dir')}")
    if not info["complete"]:
        return (f"token folder {info['path']}: INCOMPLETE (interrupted or running; never used as data): "
                f"{info['chunks_done']} chunks done, {info['documents']:,} documents, {info['tokens']:,} tokens; "
                "`difflm data prepare SPEC` resumes it")
    text = (f"token folder {info['path']} (complete)\n"
            f"  {info['source']}: {info['documents']:,} documents ({info['chars'] / 1e6:,.1f} M characters) -> "
            f"train {info['train_tokens']:,} / val {info['val_tokens']:,} tokens ({info['train_documents']:,} / "
            f"{info['val_documents']:,} documents), vocab {info['vocab_size']} ({info['dtype']}), "
            f"{info['chunk_count']} chunks, {info['disk_bytes'] / 1e6:,.1f} MB on disk, "
            f"prepared in {info['prepare_seconds']:.1f} s, skipped records {info['skipped_records']}")
    if "packed" in info:
        text += f"\n  packed: {info['packed']}"
    return text


def info_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, default=str)
