"""Which attention kernel a run takes: on GPUs a packed batch should need no dense (s x s) mask.

transformers finds the documents of a packed row from position ids that restart at 0 (see dtrain.data.collate).
flash_attention_2 turns them into the cu_seqlens of its varlen kernel: no mask at all, O(s) memory. sdpa instead
gets an explicit block-diagonal boolean mask, which rules out PyTorch's flash kernel and leaves the memory-efficient
one (exact, but slower and the mask costs s² bytes per row). So `auto` takes flash_attention_2 on CUDA when the
flash-attn package is installed and activations are fp16/bf16 (its only dtypes), and sdpa everywhere else; an
explicit choice is kept as it is.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dtrain.tables import torch_dtype

if TYPE_CHECKING:
    from dtrain.config import Config

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str
    """The attn_implementation transformers is given."""
    reason: str
    """Why, in words, for `dtrain check` and the run log."""

    def line(self) -> str:
        return f"attention: {self.implementation} ({self.reason})"


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(
    configured: str, device_type: str, dtype: torch.dtype, packing: bool, flash_installed: bool
) -> AttentionChoice:
    if configured != "auto":
        return AttentionChoice(configured, "as configured")
    if device_type != "cuda":
        return AttentionChoice("sdpa", f"flash-attn kernels need CUDA; this is {device_type}")
    if dtype not in HALF_DTYPES:
        return AttentionChoice("sdpa", f"flash-attn needs fp16/bf16 activations, the run computes in {dtype}")
    if not flash_installed:
        what = "packed rows get a block-diagonal mask (memory-efficient kernel)" if packing else "padding mask"
        return AttentionChoice("sdpa", f"flash-attn is not installed; {what}")
    if packing:
        return AttentionChoice("flash_attention_2", "varlen kernel from packed position ids, no mask")
    return AttentionChoice("flash_attention_2", "padding handled by unpadding, no dense mask")


def attention_for(cfg: Config) -> AttentionChoice:
    """The choice for a run of `cfg` on this machine (CUDA when it has a GPU, as dtrain.dist decides)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch_dtype(cfg.train.precision)
    return choose_attention(cfg.model.attn_implementation, device_type, dtype, cfg.data.packing, flash_attn_installed())
