"""Minibatches: the plain epochs as before, and length buckets (train.bucket_by_length)
deterministic for a seed, covering each example once per epoch, with little padding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedfit.algorithms.base import ClientData, batch_indices
from fedfit.config import TrainConfig


def shard(n: int, seed: int = 0) -> ClientData:
    rng = np.random.default_rng(seed)
    seqs = [np.ones(int(k), dtype=np.int32) for k in rng.integers(4, 120, size=n)]
    return ClientData(0, seqs, rng.integers(0, 3, size=n), pad_id=0, lm=False)


def plain_loop(n: int, size: int, steps: int, seed: int) -> list[list[int]]:
    """The minibatches as a loop over seeded permutations, written out."""
    rng = np.random.default_rng(seed)
    order, cursor, out = rng.permutation(n), 0, []
    for _ in range(steps):
        if cursor + size > n:
            order, cursor = rng.permutation(n), 0
        out.append(order[cursor : cursor + size].tolist())
        cursor += size
    return out


def test_plain_batches_are_the_seeded_permutations() -> None:
    train = TrainConfig(local_steps=23, batch_size=16)
    got = [b.tolist() for b in batch_indices(shard(100), train, 7)]
    assert got == plain_loop(100, 16, 23, 7)


def test_buckets_are_seeded_and_cover_each_example_once_per_epoch() -> None:
    data = shard(1000)
    train = TrainConfig(local_steps=0, local_epochs=2, batch_size=16, bucket_by_length=True)
    a = [b.tolist() for b in batch_indices(data, train, 3)]
    assert a == [b.tolist() for b in batch_indices(data, train, 3)]
    assert a != [b.tolist() for b in batch_indices(data, train, 4)]
    per_epoch = 1000 // 16
    assert len(a) == 2 * per_epoch and all(len(b) == 16 for b in a)
    for epoch in (a[:per_epoch], a[per_epoch:]):
        seen = [i for b in epoch for i in b]
        assert len(set(seen)) == len(seen) == per_epoch * 16


def padded_over_useful(data: ClientData, train: TrainConfig) -> float:
    lengths = np.array([len(s) for s in data.seqs])
    batches = list(batch_indices(data, train, 0))
    return sum(lengths[b].max() * len(b) for b in batches) / sum(lengths[b].sum() for b in batches)


def test_buckets_cut_the_padding() -> None:
    data = shard(2000, seed=1)
    train = TrainConfig(local_steps=0, local_epochs=1, batch_size=16)
    plain = padded_over_useful(data, train)
    bucketed = padded_over_useful(data, replace(train, bucket_by_length=True))
    assert plain > 1.5 and bucketed < 1.05  # lengths uniform in [4, 120)
