"""Which attention kernel a run takes: on GPUs a packed batch should need no dense (s x s) mask.

flash_attention_2 runs packed rows through its varlen kernel from the document offsets the batch carries
(dtrain.data.collate.varlen_kwargs): no mask at all, O(s) memory. sdpa instead gets an explicit block-diagonal
boolean mask that transformers derives from position ids restarting at 0, which rules out PyTorch's flash kernel and
leaves the memory-efficient one (exact, but slower and the mask costs s² bytes per row). So `auto` takes
flash_attention_2 on CUDA when flash-attn imports and activations are fp16/bf16 (its only dtypes), and sdpa
everywhere else; an explicit choice is kept as it is.
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
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")
"""Kernels that take packed documents as varlen offsets; sdpa and eager take a mask built from position ids."""


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str
    """The attn_implementation transformers is given."""
    reason: str
    """Why, in words, for `dtrain check` and the run log."""
    warning: bool = False
    """The reason is something the user should fix (a flash-attn that is installed but cannot run)."""

    @property
    def varlen(self) -> bool:
        return self.implementation in VARLEN_KERNELS

    def line(self) -> str:
        return f"attention: {self.implementation} ({'WARNING: ' if self.warning else ''}{self.reason})"


def flash_attn_problem() -> str | None:
    """Why flash-attn cannot run in this process, or None when it can. Decided by importing its compiled kernels:
    a wheel built for another torch or CUDA is found by find_spec but fails on import, and would fail inside every
    rank's from_pretrained after the job started."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401 - loads the CUDA extension
    except Exception as e:  # ImportError, OSError (undefined symbol, missing CUDA library): it cannot run, whichever
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return (
            f"flash-attn is installed but does not import ({type(e).__name__}: {first_line[:160]}): "
            "a wheel built for another torch or CUDA; reinstall it for this torch"
        )
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "transformers does not accept this flash-attn (it needs >= 2.3.3 and a CUDA GPU)"
    return None


def choose_attention(
    configured: str, device_type: str, dtype: torch.dtype, packing: bool, flash_problem: str | None
) -> AttentionChoice:
    if configured != "auto":
        return AttentionChoice(configured, "as configured")
    if device_type != "cuda":
        return AttentionChoice("sdpa", f"flash-attn kernels need CUDA; this is {device_type}")
    if dtype not in HALF_DTYPES:
        return AttentionChoice("sdpa", f"flash-attn needs fp16/bf16 activations, the run computes in {dtype}")
    if flash_problem is not None:
        what = "packed rows get a block-diagonal mask (memory-efficient kernel)" if packing else "padding mask"
        return AttentionChoice("sdpa", f"{flash_problem}; {what}", warning="not installed" not in flash_problem)
    if packing:
        return AttentionChoice("flash_attention_2", "varlen kernel from the packed documents' offsets, no mask")
    return AttentionChoice("flash_attention_2", "padding handled by unpadding, no dense mask")


def attention_for(cfg: Config) -> AttentionChoice:
    """The choice for a run of `cfg` on this machine (CUDA when it has a GPU, as dtrain.dist decides)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch_dtype(cfg.train.precision)
    wants_flash = cfg.model.attn_implementation == "auto" and device_type == "cuda"
    problem = flash_attn_problem() if wants_flash else None  # importing flash-attn on a CPU host proves nothing
    return choose_attention(cfg.model.attn_implementation, device_type, dtype, cfg.data.packing, problem)
