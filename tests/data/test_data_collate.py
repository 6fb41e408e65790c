"""collate: packed rows padded to seq_len with fresh position ids; unpacked rows padded to the batch's longest."""

from __future__ import annotations

import torch

from dtrain.data import collate

A = {
    "input_ids": [1, 10, 11, 2, 1, 12, 2],
    "labels": [-100, 10, 11, 2, -100, 12, 2],
    "position_ids": [0, 1, 2, 3, 0, 1, 2],
}
B = {"input_ids": [1, 13, 2], "labels": [-100, 13, 2], "position_ids": [0, 1, 2]}


def test_collate_packed_pads_to_seq_len_as_its_own_document():
    batch = collate([A, B], pad_token_id=0, seq_len=8, packing=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(t.dtype == torch.long and t.shape == (2, 8) for t in batch.values())
    assert batch["input_ids"][1].tolist() == [1, 13, 2, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 13, 2, -100, -100, -100, -100, -100]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


def test_collate_unpacked_pads_to_longest_with_attention_mask():
    batch = collate([A, B], pad_token_id=0, seq_len=8, packing=False)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [-100, 13, 2, -100, -100, -100, -100]
