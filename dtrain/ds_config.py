"""Our config -> a DeepSpeed config dict with concrete numbers (never "auto")."""

from __future__ import annotations

from typing import Any

from dtrain.config import Config, OffloadConfig
from dtrain.layout import BatchLayout
from dtrain.tables import OPTIMIZERS


def build_deepspeed_config(cfg: Config, layout: BatchLayout, load_universal: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "train_batch_size": layout.global_batch_size,
        "gradient_clipping": cfg.train.max_grad_norm,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_optimization": _zero_section(cfg),
        # Our optimizers are built by us (torch AdamW, bitsandbytes): DeepSpeed must not swap them for its own.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if OPTIMIZERS[cfg.train.optimizer].library == "deepspeed":
        # DeepSpeed picks its CPU Adam under optimizer offload and its fused Adam on GPU.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.train.lr,
                "betas": list(cfg.train.adam_betas),
                "eps": cfg.train.adam_eps,
                "weight_decay": cfg.train.weight_decay,
            },
        }
    return config


def _zero_section(cfg: Config) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 2:
        zero.update(reduce_bucket_size=ds.reduce_bucket_size, contiguous_gradients=True)
    if ds.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            stage3_max_live_parameters=ds.stage3_max_live_parameters,
            # Consolidation is done by `dtrain export` from the shards, so saves stay sharded and fast.
            stage3_gather_16bit_weights_on_model_save=False,
        )
        if ds.offload_param.device != "none":
            zero["offload_param"] = _offload(ds.offload_param)
    if ds.stage >= 1 and ds.offload_optimizer.device != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer)
    return zero


def _offload(off: OffloadConfig) -> dict[str, Any]:
    section: dict[str, Any] = {"device": off.device, "pin_memory": off.pin_memory}
    if off.device == "nvme":
        section["nvme_path"] = off.nvme_path
    return section
