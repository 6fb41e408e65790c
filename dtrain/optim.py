"""Client optimizers. torch AdamW gives bitwise-exact resume; bitsandbytes' 8-bit/paged AdamW save memory for
adapters. `adamw_deepspeed` returns None: DeepSpeed builds its own from the generated config (and the groups of
`model_parameters`)."""

from __future__ import annotations

import torch

from dtrain.config import TrainConfig
from dtrain.tables import OPTIMIZERS

# peft's create_loraplus_optimizer gives LoRA adapters on embeddings this learning rate (its loraplus_lr_embedding).
LORAPLUS_EMBEDDING_LR = 1e-6


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float, loraplus_ratio: float | None) -> list:
    """Biases and norm weights (1-D) are not decayed. Under ZeRO-3 a parameter's shape is gone; ds_shape keeps it.

    LoRA+ (`loraplus_ratio`): peft's grouping (peft.optimizers.create_loraplus_optimizer) — lora_B and every trained
    1-D tensor (biases, DoRA magnitudes) at lr x ratio, embedding adapters at 1e-6, the rest at lr. peft's function
    cannot be used as is: it builds the optimizer itself (adamw_deepspeed is built by DeepSpeed), decays 1-D norm
    weights that are not nn.LayerNorm, and reads `param.ndim`, which is 1 for every ZeRO-3 partition (a
    modules_to_save copy of lm_head would learn at the B rate). tests/adapters/test_adapter_units.py checks that
    the learning rates equal peft's."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        one_dim = len(getattr(param, "ds_shape", param.shape)) < 2
        rate = lr
        if loraplus_ratio is not None and "lora_embedding_" in name:
            rate = LORAPLUS_EMBEDDING_LR
        elif loraplus_ratio is not None and ("lora_B" in name or one_dim):
            rate = lr * loraplus_ratio
        groups.setdefault((rate, 0.0 if one_dim else weight_decay), []).append(param)
    return [{"params": params, "lr": rate, "weight_decay": decay} for (rate, decay), params in groups.items()]


def build_optimizer(
    train: TrainConfig, model: torch.nn.Module, loraplus_ratio: float | None = None
) -> torch.optim.Optimizer | None:
    spec = OPTIMIZERS[train.optimizer]
    if spec.library == "deepspeed":
        return None
    groups = parameter_groups(model, train.weight_decay, train.lr, loraplus_ratio)
    kwargs = {"lr": train.lr, "betas": tuple(train.adam_betas), "eps": train.adam_eps}
    if spec.library == "torch":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    return getattr(bnb.optim, spec.bnb_class)(groups, **kwargs)


def deepspeed_parameters(train: TrainConfig, model: torch.nn.Module, loraplus_ratio: float | None) -> list:
    """`model_parameters` for the optimizer DeepSpeed builds (adamw_deepspeed): the trained parameters, decayed
    by the config's weight_decay; with LoRA+ the groups above, whose lr DeepSpeed's optimizer keeps per group."""
    if loraplus_ratio is not None:
        return parameter_groups(model, train.weight_decay, train.lr, loraplus_ratio)
    return [p for p in model.parameters() if p.requires_grad]
