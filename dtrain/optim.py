"""Client optimizers. torch AdamW gives bitwise-exact resume; bitsandbytes' 8-bit/paged AdamW save memory for
adapters. `adamw_deepspeed` returns None: DeepSpeed builds its own from the generated config."""

from __future__ import annotations

import torch

from dtrain.config import TrainConfig
from dtrain.tables import OPTIMIZERS


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Biases and norm weights (1-D) are not decayed. Under ZeRO-3 a parameter's shape is gone; ds_shape keeps it."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            shape = getattr(param, "ds_shape", param.shape)
            (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(train: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer | None:
    spec = OPTIMIZERS[train.optimizer]
    if spec.library == "deepspeed":
        return None
    groups = [g for g in parameter_groups(model, train.weight_decay) if g["params"]]
    kwargs = {"lr": train.lr, "betas": tuple(train.adam_betas), "eps": train.adam_eps}
    if spec.library == "torch":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    return getattr(bnb.optim, spec.bnb_class)(groups, **kwargs)
