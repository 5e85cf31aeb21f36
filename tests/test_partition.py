import numpy as np
import pytest

from dali_ba.data.partition import eval_shard, train_shard
from dali_ba.errors import UsageError


@pytest.mark.parametrize("n, world, batch", [(64, 2, 8), (40, 4, 5), (96, 3, 4)])
def test_train_shards_disjoint_and_cover_when_divisible(n, world, batch):
    for epoch in range(3):
        shards = [train_shard(n, r, world, batch, seed=7, epoch=epoch) for r in range(world)]
        joined = np.concatenate(shards)
        assert len(joined) == n and set(joined.tolist()) == set(range(n))
        assert all(len(s) == len(shards[0]) and len(s) % batch == 0 for s in shards)


@pytest.mark.parametrize("n, world, batch", [(13, 2, 4), (101, 4, 8), (5, 2, 8)])
def test_train_shards_cover_everything_with_equal_steps(n, world, batch):
    shards = [train_shard(n, r, world, batch, seed=0, epoch=1) for r in range(world)]
    joined = np.concatenate(shards)
    assert set(joined.tolist()) == set(range(n))  # every sample seen this epoch
    assert len(joined) - n < world * batch  # only the last global step is padded
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) % batch == 0


def test_train_order_reshuffles_per_epoch_and_follows_the_seed():
    a = [train_shard(100, 0, 2, 10, seed=1, epoch=e) for e in range(3)]
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
    assert np.array_equal(a[1], train_shard(100, 0, 2, 10, seed=1, epoch=1))
    assert not np.array_equal(a[1], train_shard(100, 0, 2, 10, seed=2, epoch=1))


@pytest.mark.parametrize("n, world, batch", [(13, 2, 4), (10, 2, 5), (7, 3, 2), (3, 3, 8)])
def test_eval_shards_see_each_sample_once(n, world, batch):
    seen = []
    lengths = set()
    for r in range(world):
        order, real = eval_shard(n, r, world, batch)
        lengths.add(len(order))
        assert len(order) % batch == 0
        seen += order[:real].tolist()
    assert sorted(seen) == list(range(n))
    assert len(lengths) == 1  # same number of batches on every rank


def test_more_ranks_than_samples_is_an_error():
    with pytest.raises(UsageError, match="3 samples but there are 4 ranks"):
        train_shard(3, 0, 4, 1, seed=0, epoch=0)
    with pytest.raises(UsageError, match="batch size per rank must be >= 1"):
        eval_shard(10, 0, 1, 0)
