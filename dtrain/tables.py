"""The names a config may use for dtypes and optimizers, and what each means: one table each, used by the config
checks, the model builders, the optimizer factory, the DeepSpeed config, the planner and export.

Nothing here imports torch: the launcher validates configs without loading the modelling stack.
"""

from __future__ import annotations

from dataclasses import dataclass

# config name -> (torch dtype attribute, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {"bf16": ("bfloat16", 2), "fp16": ("float16", 2), "fp32": ("float32", 4)}
TRAINING_PRECISIONS = ("bf16", "fp32")
"""fp16 training needs loss scaling, which dtrain does not configure: bf16 or fp32 only."""


def torch_dtype(name: str):
    """The torch dtype of a config dtype name ("bf16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, DTYPES[name][0])


def dtype_bytes(name: str) -> int:
    return DTYPES[name][1]


@dataclass(frozen=True)
class Optimizer:
    name: str
    library: str
    """torch: torch.optim.AdamW built by dtrain; deepspeed: built by DeepSpeed from the generated config (its CPU
    Adam under optimizer offload, fused Adam on GPU); bitsandbytes: `bnb.optim.<cls>` built by dtrain."""
    state_bytes: float
    """Bytes per trained element of the optimizer's own state beside the fp32 master copy: Adam's two fp32 moments
    (8), or bitsandbytes' 8-bit moments, uint8 plus one fp32 absmax per 256-value block each. Under DeepSpeed the
    optimizer sees flat fp32 groups, so bnb's small-tensor fp32 fallback (< 4096 elements) does not apply."""
    bnb_class: str | None = None
    adapters_only: bool = False
    """bitsandbytes' optimizers are for adapters: full fine-tuning under ZeRO uses a 32-bit AdamW."""


_BNB_8BIT_STATE = 2 + 2 * 4 / 256
OPTIMIZERS: dict[str, Optimizer] = {
    o.name: o
    for o in (
        Optimizer("adamw_torch", "torch", 8.0),
        Optimizer("adamw_deepspeed", "deepspeed", 8.0),
        Optimizer("adamw_8bit", "bitsandbytes", _BNB_8BIT_STATE, "AdamW8bit", adapters_only=True),
        Optimizer("paged_adamw_8bit", "bitsandbytes", _BNB_8BIT_STATE, "PagedAdamW8bit", adapters_only=True),
        Optimizer("paged_adamw_32bit", "bitsandbytes", 8.0, "PagedAdamW32bit", adapters_only=True),
    )
}
