"""Batching samples into tensors.

With packing, every row is padded to seq_len and NO attention_mask is returned: transformers (5.x,
`masking_utils.find_packed_sequence_indices`) then derives a block-diagonal causal mask from position_ids that
restart at 0, for eager and sdpa. flash_attention_2 reads position ids only for a batch of ONE row
(`_is_packed_sequence` in modeling_flash_attention_utils): with more rows it would run each as one causal sequence,
across its documents. So for flash kernels the batch also carries the document boundaries over the flattened batch
(`varlen_kwargs`), which transformers hands to the varlen kernel as they are, for any batch size. The padding tail
gets its own positions 0, 1, ... so it forms a separate "document" that no real token attends to.
The model must be called with `use_cache=False`: with a KV cache present transformers skips the packed-sequence
detection and documents silently attend to each other (the default config has use_cache=True).

Without packing, rows are padded to the longest row of the batch and an attention_mask marks the real tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from dtrain.data.formats import IGNORE


def collate(
    samples: list[dict[str, list[int]]], pad_token_id: int | None, seq_len: int, packing: bool
) -> dict[str, torch.Tensor]:
    """input_ids, labels, position_ids (and attention_mask without packing) as LongTensor [B, T]."""
    if pad_token_id is None:  # e.g. Llama 3 has no pad token; padding is never attended nor trained, any id works
        pad_token_id = 0
    if not samples:
        raise ValueError("collate: empty batch")
    width = seq_len if packing else max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    # Padding positions count from 0: a fresh document when packed; harmless (masked) when not.
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(samples), 1)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        if n > width:
            raise ValueError(f"collate: sample of {n} tokens exceeds seq_len {seq_len}")
        input_ids[row, :n] = torch.tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(sample["labels"], dtype=torch.long)
        position_ids[row, :n] = torch.tensor(sample["position_ids"], dtype=torch.long)
        position_ids[row, n:] = torch.arange(width - n, dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packing:
        batch["attention_mask"] = attention_mask
    return batch


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """The flash-attn varlen arguments of a packed batch: every document's start (position id 0) over the batch
    flattened to one sequence, as cumulative int32 offsets, and the longest document as a Python int (a tensor
    would make every attention layer read it back to the host). Computed on the host, once per micro batch."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    offsets = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int(offsets.diff().max())
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}


@dataclass(frozen=True)
class Batcher:
    """Rows -> the model's keyword arguments: the one way training, eval and bench/gpu_check.py build them."""

    pad_token_id: int | None
    seq_len: int
    packing: bool
    varlen: bool
    """The attention kernel takes packed documents as varlen offsets (flash); see dtrain.attention."""
    device: torch.device

    def host(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        """Collated on the host; in pinned memory when it goes to a GPU, so the copy can run asynchronously."""
        batch: dict[str, Any] = collate(rows, self.pad_token_id, self.seq_len, self.packing)
        if self.packing and self.varlen:
            batch.update(varlen_kwargs(batch["position_ids"]))
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        non_blocking = self.device.type == "cuda"
        moved = {k: v.to(self.device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
        # No KV cache in training: with one, transformers ignores packed position_ids and documents attend to
        # each other.
        return {**moved, "use_cache": False}

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        return self.to_device(self.host(rows))


Item, Made = TypeVar("Item"), TypeVar("Made")


def prefetched(make: Callable[[Item], Made], items: Sequence[Item], executor: Executor) -> Iterator[Made]:
    """make(item) for each item in order, the next one being made on `executor` while the caller uses the current
    one: the host collates micro batch k + 1 while the accelerator runs micro batch k."""
    if not items:
        return
    pending = executor.submit(make, items[0])
    for item in items[1:]:
        current, pending = pending.result(), executor.submit(make, item)
        yield current
    yield pending.result()
