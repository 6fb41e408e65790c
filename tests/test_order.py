"""Data order: a pure function of (seed, epoch, global sample index), independent of the number of ranks."""

from __future__ import annotations

import pytest

from dtrain.config import ConfigError, TrainConfig
from dtrain.layout import BatchLayout
from dtrain.order import DataOrder, rank_micro_batches


def test_steps_cover_each_epoch_once_and_epochs_differ():
    order = DataOrder(num_samples=50, global_batch_size=8, seed=3)
    assert order.steps_per_epoch == 6
    epoch0 = [i for s in range(6) for i in order.step_samples(s * 8)]
    epoch1 = [i for s in range(6, 12) for i in order.step_samples(s * 8)]
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48
    assert epoch0 != epoch1
    assert order.epoch_of(6 * 8) == 1
    assert DataOrder(50, 8, seed=3).step_samples(16) == order.step_samples(16)
    assert DataOrder(50, 8, seed=4).step_samples(16) != order.step_samples(16)


@pytest.mark.parametrize("world,micro", [(1, 8), (2, 2), (4, 1), (2, 4)])
def test_every_layout_reads_the_same_global_batch(world, micro):
    step = DataOrder(100, 8, seed=0).step_samples(24)
    split = [rank_micro_batches(step, r, world, micro) for r in range(world)]
    seen = sorted(i for rank in split for batch in rank for i in batch)
    assert seen == sorted(step)
    assert all(len(batches) == 8 // (world * micro) for batches in split)


def test_global_batch_kept_across_world_sizes():
    train = TrainConfig(micro_batch_size=2, global_batch_size=16, max_steps=1)
    assert BatchLayout.from_config(train, 2).gradient_accumulation_steps == 4
    assert BatchLayout.from_config(train, 4).gradient_accumulation_steps == 2
    with pytest.raises(ConfigError, match="not a multiple"):
        BatchLayout.from_config(train, 3)
    accum = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=2, max_steps=1)
    assert BatchLayout.from_config(accum, 1, global_batch_size=8).gradient_accumulation_steps == 4
