"""The partition of a data set between ranks: which samples each rank reads in each epoch, decided up
front from (seed, epoch, rank, world). (Tar shards on disk are :mod:`dali_ba.data.shard_writer`'s.)

Computed, not kept as reader state: every rank computes the same global permutation, so its share
(``train_shard``, ``eval_shard``) is disjoint from the others' without communication, and a run can
resume at any (epoch, step).
"""

from __future__ import annotations

import numpy as np

from dali_ba.errors import UsageError


def _check(num_samples: int, rank: int, world_size: int, batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"batch size per rank must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is outside world size {world_size}")
    if num_samples < world_size:
        raise UsageError(f"dataset has {num_samples} samples but there are {world_size} ranks")


def train_shard(num_samples: int, rank: int, world_size: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Sample indices for ``rank`` in ``epoch``: a whole number of batches, the same count on all ranks.

    The epoch's global permutation (from ``seed`` and ``epoch``) is wrapped round to fill the last
    global step, then dealt out rank by rank. Together the shards cover every sample each epoch; they
    overlap only in that padding (fewer than ``world_size * batch_size`` samples), and not at all when
    ``num_samples`` divides evenly.
    """
    _check(num_samples, rank, world_size, batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    global_batch = world_size * batch_size
    steps = -(-num_samples // global_batch)
    padded = np.resize(order, steps * global_batch)  # np.resize repeats from the start
    return padded[rank::world_size]


def eval_shard(num_samples: int, rank: int, world_size: int, batch_size: int) -> tuple[np.ndarray, int]:
    """Indices for ``rank`` padded to the same number of batches on every rank, and how many are real.

    Rank r owns samples r, r+W, r+2W, ...: every sample exactly once across ranks. The padding
    (repeats of the rank's first sample) only keeps batch counts equal; callers drop it.
    """
    _check(num_samples, rank, world_size, batch_size)
    own = np.arange(rank, num_samples, world_size)
    per_rank = -(-num_samples // world_size)
    steps = -(-per_rank // batch_size)
    padded = np.concatenate([own, np.full(steps * batch_size - len(own), own[0])])
    return padded, len(own)
