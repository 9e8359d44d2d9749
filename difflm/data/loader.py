"""Batches of packed blocks for data-parallel training and evaluation.

Plain numpy, no torch DataLoader: blocks are already token ids in (memory-mapped)
arrays, so a batch is one fancy-index; the trainer moves it to the device.

Training: an infinite stream. Epoch ``e`` uses a permutation drawn from
``SeedSequence([seed, e])`` (so different seeds never share an epoch's order, as
``seed + e`` would), identical on every rank; the permutation is trimmed to a
multiple of ``batch_size * world_size`` (drop_last) and rank ``r`` takes positions
``r, r + world_size, ...``. Within an epoch the ranks' rows are therefore
disjoint, and every rank yields the same number of batches, so collective ops stay
in lockstep.

Evaluation: one pass in order; rank ``r`` takes a contiguous slice of the rows
(sizes differ by at most one) and yields it in batches, the last one possibly
short. Every row is seen exactly once across ranks (no padding duplicates, which
would bias the loss). Ranks may therefore yield *different numbers of batches*
(a rank yields none when there are fewer rows than ranks): accumulate sums
locally (NLL sum, token count) and all-reduce them once after the loop; never run
a collective per eval batch. :func:`eval_batches_per_rank` tells how many batches
each rank gets (e.g. to run dummy forwards under ZeRO-3, whose forward gathers
parameters collectively).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["iterate_train_batches", "iterate_eval_batches", "train_batches_per_epoch", "eval_batches_per_rank"]


def _check(blocks: np.ndarray, batch_size: int, rank: int, world_size: int) -> None:
    if blocks.ndim != 2:
        raise ValueError(f"blocks must be a 2-D (num_blocks, seq_len) array, got shape {blocks.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


def train_batches_per_epoch(num_blocks: int, batch_size: int, world_size: int) -> int:
    """Batches each rank yields per epoch (drop_last)."""
    return num_blocks // (batch_size * world_size)


def iterate_train_batches(blocks: np.ndarray, batch_size: int, *, rank: int, world_size: int, seed: int,
                          start_batch: int = 0) -> Iterator[np.ndarray]:
    """Infinite ``(batch_size, seq_len)`` int64 batches of this rank's shard, reshuffled every epoch.

    ``start_batch``: batches this rank already consumed (resume from a checkpoint); the
    stream continues exactly where an uninterrupted run would be, without replaying.
    """
    _check(blocks, batch_size, rank, world_size)
    per_epoch = train_batches_per_epoch(len(blocks), batch_size, world_size)
    if per_epoch == 0:
        raise ValueError(
            f"the train set has {len(blocks)} blocks, fewer than batch_size * world_size = "
            f"{batch_size} * {world_size} = {batch_size * world_size}; lower the batch size or seq_len, "
            "use fewer workers, or add data"
        )
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    epoch, offset = divmod(start_batch, per_epoch)
    used = per_epoch * batch_size * world_size
    while True:
        perm = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(blocks))
        mine = perm[:used][rank::world_size].reshape(per_epoch, batch_size)
        for i in range(offset, per_epoch):
            yield np.asarray(blocks[mine[i]], dtype=np.int64)
        epoch, offset = epoch + 1, 0


def _eval_bounds(num_blocks: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous row range; sizes differ by at most one across ranks."""
    return rank * num_blocks // world_size, (rank + 1) * num_blocks // world_size


def eval_batches_per_rank(num_blocks: int, batch_size: int, world_size: int) -> list[int]:
    """How many batches each rank gets from :func:`iterate_eval_batches`."""
    counts = []
    for r in range(world_size):
        lo, hi = _eval_bounds(num_blocks, r, world_size)
        counts.append(-(-(hi - lo) // batch_size))
    return counts


def iterate_eval_batches(blocks: np.ndarray, batch_size: int, *, rank: int,
                         world_size: int) -> Iterator[np.ndarray]:
    """This rank's share of ``blocks`` in order, as int64 batches of at most ``batch_size`` rows.

    Across ranks every row appears exactly once; ranks may get different (even zero)
    batch counts, so all-reduce the accumulated sums after the loop, not per batch.
    """
    _check(blocks, batch_size, rank, world_size)
    lo, hi = _eval_bounds(len(blocks), rank, world_size)
    for start in range(lo, hi, batch_size):
        yield np.asarray(blocks[start:min(start + batch_size, hi)], dtype=np.int64)
