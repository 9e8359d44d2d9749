"""Batches of packed blocks for data-parallel training.

Plain numpy, no torch DataLoader: blocks are already token ids in (memory-mapped)
arrays, so a batch is one fancy-index; the trainer moves it to the device.

Training: an infinite stream. Epoch ``e`` uses a permutation drawn from
``SeedSequence([seed, e])`` (so different seeds never share an epoch's order, as
``seed + e`` would), identical on every rank; the permutation is trimmed to a
multiple of ``batch_size * world_size`` (drop_last) and rank ``r`` takes positions
``r, r + world_size, ...``. Within an epoch the ranks' rows are therefore
disjoint, and every rank yields the same number of batches, so collective ops stay
in lockstep.

Evaluation is not here: :func:`difflm.evaluation.val_pass` scores the val split (each worker a
contiguous shard, :func:`difflm.evaluation.val_shard`), the one protocol training's validation
and ``difflm eval`` share.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["iterate_train_batches", "train_batches_per_epoch"]


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
