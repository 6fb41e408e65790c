"""Packing: block layout, and the equality that matters — a packed document's loss equals its loss alone."""

from __future__ import annotations

from itertools import pairwise

import torch

from dtrain.data import collate, prepare_data
from dtrain.data.packing import best_fit_decreasing
from dtrain.tiny import SAMPLE_DIR as SAMPLE


def test_best_fit_decreasing_is_deterministic_and_fits():
    lengths = [7, 3, 5, 2, 9, 1, 4, 4, 6, 10]
    bins = best_fit_decreasing(lengths, 10)
    assert bins == best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 6  # sum 51 -> at least 6 bins of 10; BFD reaches it here
    assert bins[0] == [9] and bins[1] == [4, 5]  # longest first; the last item (length 1) fills the oldest room-1 bin


def _doc_losses(model, input_ids, labels, position_ids):
    """Per-document summed token loss (sum of CE over the document's shifted labels) for one packed row."""
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0, :-1]
    targets = labels[0, 1:]
    ce = torch.nn.functional.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none")
    ce = torch.where(targets == -100, torch.zeros_like(ce), ce)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
    # The loss for predicting token j sits at index j-1, so a document [a, b) owns ce[a : b-1].
    return [ce[a : b - 1].sum() for a, b in pairwise(starts)]


def test_packed_loss_equals_each_document_alone(make_cfg, tokenizer, loaded_tiny_model):
    cfg = make_cfg((SAMPLE / "text.jsonl", "text"), seq_len=1024)
    prepared = prepare_data(cfg, tokenizer, rank=0, world_size=1)
    # A block holding several documents, collated as the trainer would (padded to seq_len, no attention mask).
    index = next(
        i
        for i in range(len(prepared.train))
        if prepared.train[i]["position_ids"].count(0) >= 3 and len(prepared.train[i]["input_ids"]) < 1024
    )
    batch = collate([prepared.train[index]], tokenizer.pad_token_id, 1024, packing=True)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = _doc_losses(loaded_tiny_model, batch["input_ids"], batch["labels"], batch["position_ids"])
        sample = prepared.train[index]
        starts = [i for i, p in enumerate(sample["position_ids"]) if p == 0] + [len(sample["input_ids"])]
        assert len(sample["input_ids"]) < 1024 and len(packed) == len(starts)  # documents + the padding tail
        for doc, (a, b) in enumerate(pairwise(starts)):
            ids = torch.tensor([sample["input_ids"][a:b]])
            alone = _doc_losses(
                loaded_tiny_model, ids, torch.tensor([sample["labels"][a:b]]), torch.arange(b - a)[None]
            )[0]
            assert torch.allclose(packed[doc], alone, atol=1e-5, rtol=1e-5), (doc, packed[doc], alone)
    # The padding tail trains nothing.
    assert packed[-1] == 0


def test_packed_batch_loss_with_kv_cache_differs(tokenizer, loaded_tiny_model):
    """Why the trainer must pass use_cache=False: with a cache transformers ignores the packed position ids."""
    ids = torch.randint(5, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(12), torch.arange(8)])[None]
    with torch.no_grad():
        alone = loaded_tiny_model(input_ids=ids[:, 12:], use_cache=False).logits
        packed = loaded_tiny_model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, 12:]
        cached = loaded_tiny_model(input_ids=ids, position_ids=pos, use_cache=True).logits[:, 12:]
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(cached, alone, atol=1e-3)
