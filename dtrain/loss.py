"""Chunked cross-entropy: the LM head and the loss over slices of tokens, so the full-vocabulary logits of a micro
batch never exist at once.

The plain transformers forward computes logits [tokens, V], upcasts them to fp32 and takes a log-softmax:
max(a + 8, 12)·V bytes per token (a = bytes of the compute dtype; dtrain.plan.memory), 1.5 MB per token at Llama-3's
128,256-token vocabulary — the activation peak of a step. Here the tokens are split into slices, each one's head +
loss under non-reentrant activation checkpointing: forward keeps only the loss, backward recomputes one slice's
logits at a time. The price is one more forward of the head (2·h·V flops per token, ~2 % of a Llama-3-8B step).

The head is called as a module, never through its weight: under ZeRO-3 DeepSpeed's module hooks gather lm_head's
weight for each call and for its recomputation in backward, and peft's wrappers (LoRA on lm_head, modules_to_save)
and tied embeddings take part exactly as in the plain forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dtrain.data.formats import IGNORE
from dtrain.plan.shape import CHUNKABLE_MODEL_TYPES


def causal_lm_loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | None,
    chunks: int,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss (labels shifted within each row, IGNORE skipped, fp32 logits; the sum divided by
    `num_items_in_batch`, else the mean over labelled tokens) from hidden states [B, T, h], `chunks` slices at once."""
    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    size = math.ceil(targets.numel() / chunks)
    # Fixed slices over all tokens (not only labelled ones): selecting those would cost a host sync per micro batch
    # and vary the number of head calls, which ZeRO-3's prefetch trace records.
    sliced = zip(hidden.split(size), targets.split(size), strict=True)
    if torch.is_grad_enabled():
        total = sum(checkpoint(_slice_loss, head, h, t, use_reentrant=False) for h, t in sliced)
    else:
        total = sum(_slice_loss(head, h, t) for h, t in sliced)
    if num_items_in_batch is None:
        return total / (targets != IGNORE).sum()
    return total / num_items_in_batch


def _slice_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE, reduction="sum")


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside `model` (itself, or the base of a peft model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunks_for(model: torch.nn.Module, tokens: int) -> int:
    """Slices the chunked loss uses for `model` on micro batches of up to `tokens` (dtrain.plan's `loss_chunks`);
    1 where it does not apply or would not need less memory."""
    from dtrain.plan.memory import loss_chunks
    from dtrain.plan.shape import ModelShape

    causal_lm = causal_lm_of(model)
    config = causal_lm.config
    if config.model_type not in CHUNKABLE_MODEL_TYPES:
        return 1
    shape = ModelShape.from_hf_config(config.to_dict())
    head = causal_lm.get_output_embeddings().weight
    frozen_base = causal_lm is not model
    return loss_chunks(shape, head.element_size(), tokens, frozen_base, head_trained=head.requires_grad)


def install_chunked_loss(model: torch.nn.Module, tokens: int) -> int:
    """Make `model`'s forward compute its loss chunked when called with labels (training and eval; without labels,
    e.g. for generation, it is the plain forward), for micro batches of up to `tokens`. Returns the slices used; 1
    leaves the model unchanged.

    The causal LM's `forward` is replaced on the instance, not the class: DeepSpeed's engine and peft call it through
    the module as before, and the module tree, its hooks and its state dict stay the same."""
    chunks = chunks_for(model, tokens)
    if chunks < 2:
        return 1
    causal_lm = causal_lm_of(model)
    plain_forward = causal_lm.forward

    def forward(*args: Any, labels: torch.Tensor | None = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if labels is None:
            return plain_forward(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = causal_lm.get_decoder()(*args, **kwargs).last_hidden_state
        head = causal_lm.get_output_embeddings()
        return CausalLMOutputWithPast(loss=causal_lm_loss(hidden, head, labels, num_items_in_batch, chunks))

    causal_lm.forward = forward
    return chunks
