"""Length-grouped ordering for packing off: batches of similar-length examples, so dynamic padding wastes little.

The trainer owns the data order; with `data.group_by_length` it calls this instead of a plain permutation:

    order = group_by_length(prepared.train.lengths, global_batch, seed, epoch)
    # order[k * global_batch : (k + 1) * global_batch] is global batch k (split over ranks and micro batches)

Like the plain order, it is a pure function of (seed, epoch) over the global sample index, so a checkpoint's data
position is still a global sample count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BATCHES_PER_GROUP = 64  # sort within groups of this many global batches: similar lengths, still well shuffled


def group_by_length(lengths: Sequence[int], global_batch: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(len(lengths)) in which each run of `global_batch` indices has similar lengths.

    Shuffle; cut into groups of BATCHES_PER_GROUP global batches; sort each group by length (longest first);
    cut into global batches and shuffle the batches. The batch holding the longest example goes first, so an
    out-of-memory shows at step 1 rather than hours in. A short final batch, if any, stays last.
    """
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch, 0x6B1])
    order = rng.permutation(len(lengths))
    group = global_batch * BATCHES_PER_GROUP
    sorted_chunks = [
        chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(order, range(group, len(order), group))
    ]
    flat = np.concatenate(sorted_chunks) if sorted_chunks else order
    full = len(flat) // global_batch * global_batch
    batches = flat[:full].reshape(-1, global_batch)
    tail = flat[full:]
    if len(batches):
        batches = batches[rng.permutation(len(batches))]
        longest = int(np.argmax(lengths[batches].max(axis=1)))
        batches[[0, longest]] = batches[[longest, 0]]
    return np.concatenate([batches.reshape(-1), tail]).astype(np.int64).tolist()
