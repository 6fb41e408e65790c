"""`Samples`: the training sequences, stored as flat int32 arrays plus offsets, in memory or memory-mapped.

A sample is one packed block (several documents) or one example (packing off), at most seq_len tokens, unpadded:
`collate` pads. Position ids restart at 0 for every document, which is also how the model finds the document
boundaries (see dtrain.data.collate).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dtrain.data.formats import IGNORE, Example

_ARRAYS = ("input_ids", "labels", "position_ids", "offsets", "label_counts")


class Samples:
    def __init__(self, input_ids, labels, position_ids, offsets, label_counts):
        self.input_ids, self.labels, self.position_ids = input_ids, labels, position_ids
        self.offsets = offsets  # int64 [n + 1]: sample i is [offsets[i], offsets[i + 1])
        self.label_counts = label_counts  # int64 [n]: labels[1:] != -100 per sample

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        i = i % len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {
            "input_ids": self.input_ids[a:b].tolist(),
            "labels": self.labels[a:b].tolist(),
            "position_ids": self.position_ids[a:b].tolist(),
        }

    def num_label_tokens(self, i: int) -> int:
        """Tokens that contribute to the loss after the causal shift (labels[1:] != -100); O(1)."""
        return int(self.label_counts[i])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample, unpadded (for length-grouped batching)."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def total_label_tokens(self) -> int:
        return int(self.label_counts.sum())

    @classmethod
    def from_groups(cls, examples: Sequence[Example], groups: Sequence[Sequence[int]]) -> Samples:
        """One sample per group of example indices, the group's examples concatenated in order."""
        order = [i for group in groups for i in group]
        lengths = np.array([len(examples[i]) for i in order], dtype=np.int64)
        empty = np.zeros(0, dtype=np.int32)
        input_ids = np.concatenate([examples[i].input_ids for i in order]) if order else empty
        labels = np.concatenate([examples[i].labels for i in order]) if order else empty
        # Positions restart at each document: global index minus the document's start.
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        position_ids = (np.arange(len(input_ids), dtype=np.int64) - starts).astype(np.int32)
        group_sizes = np.array([sum(len(examples[i]) for i in g) for g in groups], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64)
        # Every document starts with an IGNORE label (formats.make_example), so labels[1:] of a sample counts all.
        trained = np.concatenate([[0], np.cumsum(labels != IGNORE)]).astype(np.int64)
        label_counts = trained[offsets[1:]] - trained[offsets[:-1]]
        return cls(input_ids, labels, position_ids, offsets, label_counts)

    def save(self, folder: Path, name: str) -> None:
        for array in _ARRAYS:
            np.save(folder / f"{name}.{array}.npy", getattr(self, array))

    @classmethod
    def load(cls, folder: Path, name: str, mmap: bool = True) -> Samples:
        # Memory-mapped: every rank on a node shares the page cache instead of holding its own copy.
        mode = "r" if mmap else None
        return cls(*(np.load(folder / f"{name}.{array}.npy", mmap_mode=mode) for array in _ARRAYS))
