"""Which samples each rank reads at each step: a pure function of (seed, epoch, global sample index).

The data position saved in a checkpoint is one number, the global count of samples consumed. A run resumed on any
number of ranks continues with exactly the next samples, because the order never depends on the world size: an
optimizer step takes the next `global_batch_size` samples of the epoch's permutation, and only the split of those
samples among ranks and micro batches depends on the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from dtrain.data.grouping import group_by_length


@lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_samples: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_samples, generator=generator).tolist())


@dataclass
class DataOrder:
    num_samples: int
    global_batch_size: int
    seed: int
    lengths: Sequence[int] | None = None
    """Sample lengths for length-grouped batches (data.group_by_length, packing off); None: a plain permutation."""
    _cached: tuple[int, Sequence[int]] | None = field(default=None, repr=False)

    def epoch_order(self, epoch: int) -> Sequence[int]:
        if self.lengths is None:
            return epoch_permutation(self.seed, epoch, self.num_samples)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, group_by_length(self.lengths, self.global_batch_size, self.seed, epoch))
        return self._cached[1]

    @property
    def steps_per_epoch(self) -> int:
        # The tail of an epoch that does not fill a global batch is dropped, so every step has the same size.
        return self.num_samples // self.global_batch_size

    def step_samples(self, samples_seen: int) -> list[int]:
        """The global batch that starts at global sample count `samples_seen` (a multiple of the batch size)."""
        per_epoch = self.steps_per_epoch * self.global_batch_size
        epoch, offset = divmod(samples_seen, per_epoch)
        return list(self.epoch_order(epoch)[offset : offset + self.global_batch_size])

    def epoch_of(self, samples_seen: int) -> int:
        return samples_seen // (self.steps_per_epoch * self.global_batch_size)


def rank_micro_batches(step_samples: list[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """Split one global batch: micro batch m of rank r is slice [(m * world + r) * micro, ... + micro)."""
    per_micro_round = world_size * micro_batch_size
    rounds = len(step_samples) // per_micro_round
    return [
        step_samples[(m * world_size + rank) * micro_batch_size : (m * world_size + rank + 1) * micro_batch_size]
        for m in range(rounds)
    ]
