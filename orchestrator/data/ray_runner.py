"""Tokenize chunks across a Ray cluster with Ray Data, writing shards to the shared ``data.cache_dir``.

``difflm.data.pipeline`` streams the corpus on the driver and cuts it into chunks; this runner
sends windows of chunks through ``ray.data.from_items(...).map_batches(...)``: each Ray Data
task (one CPU, on any node) loads the saved tokenizer once per worker process and calls the
same ``difflm.data.shards.tokenize_chunk`` as a local preparation, so the shards are
byte-identical to a local run's. The driver holds at most one window of chunks (``window``,
default: the cluster's CPUs, at least 2), so its memory stays bounded. The shard files are
written by the task's node: ``data.cache_dir`` must be a folder every node sees (``difflm
train --address`` checks that).

Why the driver reads and Ray Data only tokenizes: chunk boundaries and document indices
(which decide the hash split) come from one ordered pass over the source, which keeps the
result independent of the cluster's shape. Reading is cheap next to tokenizing (~10x), so
the tokenizer is what is spread out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from difflm.data.pipeline import ChunkRunner
from difflm.data.shards import ChunkResult, ChunkTask, ShardJob, tokenize_chunk

__all__ = ["ray_data_runner"]


def _tokenize_rows(batch: dict[str, Any], job: ShardJob) -> dict[str, list[Any]]:
    """A ``map_batches`` function: each row is one chunk; returns its ChunkResult fields."""
    out: dict[str, list[Any]] = {}
    for i in range(len(batch["index"])):
        task = ChunkTask(index=int(batch["index"][i]), first_doc=int(batch["first_doc"][i]),
                         docs=[str(d) for d in batch["docs"][i]], chars=int(batch["chars"][i]))
        for k, v in asdict(tokenize_chunk(job, task)).items():
            out.setdefault(k, []).append(v)
    return out


def ray_data_runner(window: int | None = None) -> ChunkRunner:
    """A :class:`difflm.data.pipeline.ChunkRunner` over the connected Ray cluster (``ray.init`` done)."""

    def run(job: ShardJob, tasks: Iterator[ChunkTask]) -> Iterator[ChunkResult]:
        import ray
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        size = window or max(2, int(ray.cluster_resources().get("CPU", 1)))
        while True:
            chunk_tasks = list(itertools.islice(tasks, size))
            if not chunk_tasks:
                return
            items = [{"index": t.index, "first_doc": t.first_doc, "chars": t.chars, "docs": t.docs}
                     for t in chunk_tasks]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                _tokenize_rows, fn_kwargs={"job": job}, batch_size=1, num_cpus=1)
            for row in ds.iter_rows():
                yield ChunkResult(**{k: int(row[k]) for k in ChunkResult.__dataclass_fields__})

    return run
