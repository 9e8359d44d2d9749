"""The shared validation contract: which tokens count, and the val noise as common random numbers.

Every family's ``val/nll`` is computed through this module so that trials of a sweep
compare on one scale:

* **Which tokens count** (:func:`counted_positions`): packed blocks are
  ``[BOS] tokens... [EOS]`` (``difflm.data.pipeline.pack_blocks``). Position 0 (BOS) is
  never a target, and the block-final EOS is added by the packer, not a document end, so
  it does not count either. EOS tokens *inside* a block are real document ends and count.
  Training normalises its loss by the same positions, so every family (ar, mdlm, ...)
  averages over the same ``L - 2`` tokens per block.
* **Common random numbers** (:func:`make_val_noise`): the noise of val sequence ``i``
  (its K masking rates and the per-position uniforms that decide its masks) is a function
  of ``(eval_seed, i)`` only: not of the schedule, the batch size, the worker count or the
  batch order. Two trials with identical weights therefore read identical val NLL, and the
  difference between two trials has a small *paired* standard error.
* **Masking-rate space, the whole bound**: a family integrates its bound over the masking
  rate ``m`` in (0, 1], the same for every schedule, so the schedule enters the val metric
  only through the model it trained. The integrand's Monte Carlo draw ``(1/m) * sum over
  masked tokens`` has infinite variance under a uniform m (a rare masked token at tiny m gets
  weight 1/m; E[draw^2] ~ 1/m is not integrable at 0), which is why the range used to stop at
  [0.001, 0.999], ~0.2% below the full NELBO. Instead m is importance-sampled from the density
  ``p(m) = (1 - a) + a / (2 sqrt(m))`` (a = ``RATE_MIX`` = 0.25: mostly uniform, plus a share
  that goes like 1/sqrt(m) near 0), by inverting its CDF at u stratified uniform on (0, 1);
  each draw is weighted ``noise.weights = 1 / p(m)``. Near 0 the weight is ~``2 sqrt(m) / a``,
  so ``weight * (1/m) * sum`` is ~``2 / (a sqrt(m))`` per masked token, which a masked token
  only gets with probability ~``m L``: E[draw^2] is bounded (the pure u^2 map bounds it too
  but doubled the SE at large m, where its density is 1/2) and the estimate is unbiased for
  the integral over all of (0, 1]. The SE is ~10% above the old truncated estimator's (0.038
  against 0.034 on 74 blocks of 32 bytes, tests/test_evaluation.py's models). (Before
  2026-12-06, val/nll of the masked families covered [0.001, 0.999] only and read 0.009-0.018
  nats/token lower.)
* **One protocol** (:func:`val_pass`): how a val split is cut into batches and scored.
  Training's ``Runner.validate`` (each worker a contiguous shard, gathered in index order)
  and ``difflm eval`` (one process, the whole range) both call it, so eval reproduces
  training's ``val/nll`` by construction. ``train.eval_batches`` caps the split to its first
  ``eval_batches * micro_batch_size`` sequences (:func:`val_count`), whatever the worker count.
* **Error bars** (:class:`ValDraws`): every sequence gets K draws; ``val/nll`` is the mean
  over draws of the per-sequence sums over the token count, ``val/nll_se`` its Monte Carlo
  standard error *conditional on the val split* (the noise's error, not the split's sampling
  error, which every trial shares). The K draws are stratified (one offset per sequence); the
  error treats them as independent, which ignores what stratification saves (measured at
  quickstart size over 10 eval seeds: SE 0.0157 vs an actual spread of 0.0166 at K = 16,
  0.022 vs 0.0165 at K = 8). The draws are heavy-tailed at tiny masking rates (weight 1/m on
  a rare masked token), so on a val split of only tens of sequences one SE can be off by ~2x.
  :func:`paired_difference` gives the error of the difference of two models scored with the
  same noise (common random numbers): the per-draw differences vary far less than either
  model's draws.

Plain PyTorch + numpy; no Ray or DeepSpeed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflm.atomic import atomic_path
# ValNoise and the rate range live in the leaf types module (families read them too); re-exported here.
from difflm.types import RATE_MAX, RATE_MIN, Scorer, ValNoise

#: The share of the rate density that goes like 1 / sqrt(m) near 0 (importance sampling with bounded variance;
#: the rest is uniform), module doc.
RATE_MIX: float = 0.25
#: u is kept inside [U_EPS, 1 - U_EPS] (a float draw of exactly 0 or 1 would give m = 0 or 1 - m = 0).
U_EPS: float = 1e-12


def counted_positions(tokens: Tensor) -> Tensor:
    """(B, L) bool: the positions whose tokens count as targets (every family, training and val).

    Excludes position 0 (BOS) and position L-1 (the packer's block-final EOS); see the module docstring.
    """
    counted = torch.ones_like(tokens, dtype=torch.bool)  # (B, L)
    counted[:, 0] = False
    counted[:, -1] = False
    return counted


def _sequence_seed(seed: int, index: int) -> tuple[int, int]:
    """Two 63-bit seeds from (seed, index): one for the torch draws, one handed to families."""
    a, b = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, np.uint64)
    return int(a) & 0x7FFF_FFFF_FFFF_FFFF, int(b) & 0x7FFF_FFFF_FFFF_FFFF


def make_val_noise(
    indices: Tensor | np.ndarray | list[int],
    samples: int,
    length: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> ValNoise:
    """The val noise of the sequences with val-split ``indices`` (B,), K = ``samples`` draws of ``length``.

    Drawn on the CPU from one generator per sequence seeded by (seed, index), then moved to
    ``device``: the same numbers on every device, batch size and worker count. The rates stay
    float64 except on MPS (no float64 there: float32, which can flip a mask decision within
    ~1e-7 of a rate, so MPS val numbers match other devices only to MC error).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
    B = len(idx)
    us = torch.empty(B, samples, dtype=torch.float64)  # (B, K)
    uniforms = torch.empty(B, samples, length, dtype=torch.float32)  # (B, K, L)
    seeds = torch.empty(B, dtype=torch.int64)  # (B,)
    strata = torch.arange(samples, dtype=torch.float64)  # (K,)
    gen = torch.Generator(device="cpu")
    for b, i in enumerate(idx):
        draw_seed, family_seed = _sequence_seed(seed, i)
        gen.manual_seed(draw_seed)
        offset = torch.rand(1, generator=gen, dtype=torch.float64)  # (1,)
        us[b] = ((strata + offset) / samples).clamp(U_EPS, 1.0 - U_EPS)
        uniforms[b] = torch.rand(samples, length, generator=gen, dtype=torch.float32)
        seeds[b] = family_seed
    a = RATE_MIX
    # (B, K) sqrt(m) from u = F(m) = (1 - a) m + a sqrt(m), the CDF of p(m) = (1 - a) + a / (2 sqrt(m))
    roots = (torch.sqrt(a * a + 4.0 * (1.0 - a) * us) - a) / (2.0 * (1.0 - a))
    rates = (roots**2).clamp(max=1.0)  # (B, K)
    weights = 2.0 * roots / (2.0 * (1.0 - a) * roots + a)  # (B, K) 1 / p(m)
    device = torch.device(device)
    wide = torch.float32 if device.type == "mps" else torch.float64
    return ValNoise(
        rates=rates.to(device=device, dtype=wide),
        uniforms=uniforms.to(device),
        seeds=seeds.to(device),
        weights=weights.to(device=device, dtype=wide),
        uniform=us.to(device=device, dtype=wide),
    )


# ---- the val protocol --------------------------------------------------------------------------


def val_count(num_blocks: int, eval_batches: int | None, batch_size: int) -> int:
    """How many val sequences are scored: all, or the first ``eval_batches * batch_size`` (``train.eval_batches``).

    The cap is a prefix of the split by index, so it does not depend on the worker count; it
    does depend on the micro batch size, so trials that search ``micro_batch_size`` should
    leave ``eval_batches`` unset (or compare on the common prefix, as ``difflm results`` does)."""
    return num_blocks if eval_batches is None else min(num_blocks, eval_batches * batch_size)


def val_shard(num: int, rank: int, world_size: int) -> tuple[int, int]:
    """Worker ``rank``'s contiguous index range [lo, hi) of ``num`` val sequences; sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank * num // world_size, (rank + 1) * num // world_size


def val_batches_per_worker(num: int, batch_size: int, world_size: int) -> int:
    """Forward batches the busiest worker runs: every worker runs this many (ZeRO-3 gathers are collective)."""
    return max(-(-(hi - lo) // batch_size) for lo, hi in (val_shard(num, r, world_size) for r in range(world_size)))


@dataclass
class ValDraws:
    """K draws of the val NLL (bound) per sequence: what one eval point measured, sequence by sequence.

    indices: (n,) int64, the sequences' indices in the val split (the key of their noise).
    sums:    (n, K) float64, per-sequence sums over counted tokens, one column per noise draw;
             each column is an unbiased estimate of that sequence's NLL (bound) in nats.
    counts:  (n,) float64, counted tokens per sequence (:func:`counted_positions`).
    meta:    how they were made (seed, family, step, ...), saved with them.
    """

    indices: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    meta: dict[str, Any] | None = None

    @property
    def samples(self) -> int:
        return int(self.sums.shape[1])

    @property
    def tokens(self) -> float:
        return float(self.counts.sum())

    @property
    def nll(self) -> float:
        """Nats per counted token: the mean over draws of the per-sequence sums, summed, over the token count."""
        return float(self.sums.mean(axis=1).sum()) / max(self.tokens, 1.0)

    @property
    def se(self) -> float:
        """Monte Carlo standard error of :attr:`nll` (nan with one draw per sequence); see the module doc."""
        if self.samples < 2:
            return math.nan
        var = self.sums.var(axis=1, ddof=1)  # (n,) variance of one draw per sequence
        return math.sqrt(float(var.sum()) / self.samples) / max(self.tokens, 1.0)

    def metrics(self) -> dict[str, float]:
        """The ``val/*`` scalars every front end shows: nll, nll_se, bpt, ppl, tokens."""
        mean = self.nll
        return {
            "val/nll": mean,
            "val/nll_se": self.se,
            "val/bpt": mean / math.log(2),
            "val/ppl": math.exp(min(mean, 700.0)),
            "val/tokens": self.tokens,
        }

    @classmethod
    def concat(cls, parts: list[ValDraws]) -> ValDraws:
        """Shards in the order given (callers pass them in index order)."""
        samples = {p.samples for p in parts if len(p.indices)}
        if len(samples) > 1:
            raise ValueError(f"shards with different draw counts {sorted(samples)}")
        k = samples.pop() if samples else (parts[0].samples if parts else 1)
        return cls(
            indices=np.concatenate([p.indices for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64),
            sums=np.concatenate([p.sums.reshape(-1, k) for p in parts]) if parts else np.zeros((0, k)),
            counts=np.concatenate([p.counts for p in parts]) if parts else np.zeros(0),
        )


@torch.no_grad()
def val_pass(
    model: Scorer,
    blocks: np.ndarray,
    start: int,
    stop: int,
    *,
    batch_size: int,
    samples: int,
    seed: int,
    device: torch.device | str,
    num_batches: int | None = None,
) -> ValDraws:
    """Score val sequences ``blocks[start:stop]`` (packed (N, L) ids): K = ``samples`` draws per sequence.

    Batches of ``batch_size`` consecutive sequences; sequence i's noise is
    ``make_val_noise([i], ...)``, so the result does not depend on ``batch_size``, on the range
    a worker was given or on the order (up to float rounding of batched matmuls). ``num_batches``
    (>= the batches needed) pads the pass with throw-away one-sequence batches, so that every
    worker runs the same number of forwards (DeepSpeed ZeRO-3 gathers parameters collectively).
    The model must be in eval mode; this calls ``model.val_nll`` directly (no autocast: float32
    or wider logits).
    """
    if not 0 <= start <= stop <= len(blocks):
        raise ValueError(f"val range [{start}, {stop}) is outside the {len(blocks)} val sequences")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    needed = -(-(stop - start) // batch_size)
    total = needed if num_batches is None else num_batches
    if total < needed:
        raise ValueError(f"num_batches={num_batches} is fewer than the {needed} batches of [{start}, {stop})")
    length = int(blocks.shape[1])
    sums: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for i in range(total):
        real = i < needed
        lo = start + i * batch_size
        idx = np.arange(lo, min(lo + batch_size, stop)) if real else np.array([min(start, len(blocks) - 1)])
        tokens = torch.from_numpy(np.asarray(blocks[idx], dtype=np.int64)).to(device)  # (B, L)
        counted = counted_positions(tokens)  # (B, L)
        noise = make_val_noise(idx, samples, length, seed, device)
        per = model.val_nll(tokens, counted, noise)  # (B, K)
        if tuple(per.shape) != (len(idx), samples):
            raise RuntimeError(f"{type(model).__name__}.val_nll returned shape {tuple(per.shape)}, "
                               f"expected (batch, samples) = ({len(idx)}, {samples})")
        if real:
            sums.append(per.to("cpu", torch.float64).numpy())
            counts.append(counted.sum(dim=-1).to("cpu", torch.float64).numpy())
    return ValDraws(
        indices=np.arange(start, stop, dtype=np.int64),
        sums=np.concatenate(sums) if sums else np.zeros((0, samples)),
        counts=np.concatenate(counts) if counts else np.zeros(0),
    )


# ---- comparing two models ------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedDifference:
    """``diff`` = nll(a) - nll(b) in nats/token on their common sequences, with its standard error.

    paired: True when both were scored with the same noise (same seed and K): the error is that
    of the per-draw differences. False: the two errors are combined as independent.
    sequences: how many sequences both scored (a capped val split compares on the common prefix)."""

    diff: float
    se: float
    paired: bool
    sequences: int


def paired_difference(a: ValDraws, b: ValDraws) -> PairedDifference:
    """nll(a) - nll(b) and its standard error, on the sequences both scored (see :class:`PairedDifference`)."""
    common, ia, ib = np.intersect1d(a.indices, b.indices, assume_unique=True, return_indices=True)
    if len(common) == 0:
        raise ValueError("the two evaluations share no val sequence")
    ca, cb = a.counts[ia], b.counts[ib]
    if not np.array_equal(ca, cb):
        raise ValueError("the two evaluations count different tokens per sequence (another tokenizer or val split?)")
    sa, sb = a.sums[ia], b.sums[ib]  # (n, Ka), (n, Kb)
    tokens = float(ca.sum())
    diff = float((sa.mean(axis=1) - sb.mean(axis=1)).sum()) / tokens
    ma, mb = a.meta or {}, b.meta or {}
    paired = a.samples == b.samples and ma.get("seed") == mb.get("seed")
    if paired and a.samples >= 2:
        var = (sa - sb).var(axis=1, ddof=1)  # (n,)
        se = math.sqrt(float(var.sum()) / a.samples) / tokens
    else:
        var_a = sa.var(axis=1, ddof=1).sum() / sa.shape[1] if sa.shape[1] >= 2 else math.nan
        var_b = sb.var(axis=1, ddof=1).sum() / sb.shape[1] if sb.shape[1] >= 2 else math.nan
        se = math.sqrt(float(var_a + var_b)) / tokens
    return PairedDifference(diff=diff, se=se, paired=paired, sequences=int(len(common)))


# ---- on disk -------------------------------------------------------------------------------------


def draws_path(val_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the draws of the eval at optimizer step ``step`` live: ``VAL_DIR/step_0000100.npz``."""
    return Path(val_dir) / f"step_{int(step):07d}.npz"


def save_val_draws(path: str | os.PathLike[str], draws: ValDraws) -> Path:
    """Write ``draws`` (and its meta, as JSON) to ``path`` atomically (difflm.atomic: a temp file beside it,
    fsynced, then renamed; readable like every other run file)."""
    import json

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, indices=draws.indices.astype(np.int64), sums=draws.sums.astype(np.float64),
                 counts=draws.counts.astype(np.float64), meta=np.array(json.dumps(draws.meta or {})))
    return path


def load_val_draws(path: str | os.PathLike[str]) -> ValDraws:
    """Read what :func:`save_val_draws` wrote."""
    import json

    with np.load(Path(path), allow_pickle=False) as z:
        return ValDraws(indices=z["indices"], sums=z["sums"], counts=z["counts"], meta=json.loads(str(z["meta"])))
