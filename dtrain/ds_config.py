"""Our config -> a DeepSpeed config dict with concrete numbers (never "auto").

What DeepSpeed 0.19.8 would otherwise do on its own, and why we write it out:
- bf16: the engine accumulates gradients in the model dtype unless `data_types.grad_accum_dtype` says otherwise
  (engine.get_data_types; stage 3 sums micro-batch gradients into a bf16 `grad_partitions_flat_buffer`). We ask for
  fp32 at every stage that allows it (1-3). Stage 0 refuses it ("unsupported mix of model_dtype and
  grad_accum_dtype") and keeps no fp32 master weights either, so the config refuses bf16 at stage 0
  (dtrain.config.deepspeed.precision_stage_problems).
- NVMe parameter offload: each rank's partition of a parameter must fit one swap buffer (partitioned_param_swapper
  `get_buffer`: "More elements ... than buffer size"), default 1e8 elements; Llama-3-70B's embedding is 1.05e9, so on
  fewer than 11 ranks the first load fails. `buffer_size` is computed from the model shape and the world size.
- pin_memory: DeepSpeed pins by default; on a CPU-only host pinning buys nothing and locks RAM, so our default
  (null) pins on CUDA only.
"""

from __future__ import annotations

import math
from typing import Any

from dtrain.config import Config, OffloadConfig
from dtrain.layout import BatchLayout
from dtrain.tables import OPTIMIZERS

# DeepSpeed's aio defaults (runtime/swap_tensor/constants.py), written out so the generated config shows them.
AIO = {"block_size": 1_048_576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
       "overlap_events": True}  # fmt: skip
# Swap reads/writes are aligned to 1024 bytes per aio thread (swap_tensor/utils.py AIO_ALIGNED_BYTES).
AIO_ALIGNED_BYTES = 1024
# Parameter swap buffers: DeepSpeed's default count (offload_config.py); a layer's module owns one or two parameters
# and prefetching stops when the free buffers run out, so the count bounds speed, not correctness.
PARAM_SWAP_BUFFERS = 5


def build_deepspeed_config(
    cfg: Config,
    layout: BatchLayout,
    load_universal: bool = False,
    accelerator: str | None = None,
    largest_param: int | None = None,
) -> dict[str, Any]:
    """`accelerator` ("cuda" or "cpu"; default: this machine's) decides the pin_memory defaults; `largest_param`
    (elements of the model's largest parameter) sizes NVMe parameter swap buffers — read from the model's
    config.json when not given."""
    if accelerator is None:
        import torch

        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "train_batch_size": layout.global_batch_size,
        "gradient_clipping": cfg.train.max_grad_norm,
        "bf16": _bf16_section(cfg),
        "zero_optimization": _zero_section(cfg, layout.world_size, accelerator, largest_param),
        # Our optimizers are built by us (torch AdamW, bitsandbytes): DeepSpeed must not swap them for its own.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if cfg.train.precision == "bf16" and cfg.deepspeed.stage >= 1:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if "nvme" in (cfg.deepspeed.offload_param.device, cfg.deepspeed.offload_optimizer.device):
        config["aio"] = dict(AIO)
    if OPTIMIZERS[cfg.train.optimizer].library == "deepspeed":
        # DeepSpeed picks its CPU Adam under optimizer offload and its fused Adam otherwise.
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


def _bf16_section(cfg: Config) -> dict[str, Any]:
    """train.optimizer_states bf16: master weights, gradients and Adam moments in bf16 (DeepSpeed then builds its CPU
    Adam with fp32_optimizer_states=False, engine.py _configure_basic_optimizer)."""
    section: dict[str, Any] = {"enabled": cfg.train.precision == "bf16"}
    if cfg.train.optimizer_states == "bf16":
        section.update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    return section


def param_swap_buffer_elements(largest_param: int, world_size: int) -> int:
    """Elements of one NVMe parameter swap buffer: the largest parameter's per-rank partition (DeepSpeed pads a
    parameter to a multiple of the world size and gives each rank an equal share), rounded up to the aio
    alignment. `dtrain plan` budgets PARAM_SWAP_BUFFERS of these per rank."""
    partition = math.ceil(largest_param / world_size)
    align = AIO_ALIGNED_BYTES * AIO["intra_op_parallelism"] // 2  # elements of the smallest dtype swapped (16-bit)
    return math.ceil(partition / align) * align


def largest_parameter(model_path: str) -> int:
    """Elements of the most parameters one module owns (DeepSpeed's largest_layer_params), from config.json: the
    embedding for every decoder dtrain supports. It bounds the largest single parameter; `dtrain plan` sizes the
    swap buffers from the same number."""
    from dtrain.plan.shape import load_model_shape

    return load_model_shape(model_path).largest_layer_params


def _zero_section(cfg: Config, world_size: int, accelerator: str, largest_param: int | None) -> dict[str, Any]:
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
            zero["offload_param"] = _offload(ds.offload_param, accelerator)
            if ds.offload_param.device == "nvme":
                largest = largest_param or largest_parameter(cfg.model.path)
                zero["offload_param"].update(
                    buffer_size=param_swap_buffer_elements(largest, world_size), buffer_count=PARAM_SWAP_BUFFERS
                )
    if ds.stage >= 1 and ds.offload_optimizer.device != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, accelerator)
    return zero


def pin_memory(off: OffloadConfig, accelerator: str) -> bool:
    """Page-locked host buffers speed up GPU<->host copies; on a CPU-only host they only lock RAM."""
    return accelerator == "cuda" if off.pin_memory is None else off.pin_memory


def _offload(off: OffloadConfig, accelerator: str) -> dict[str, Any]:
    section: dict[str, Any] = {"device": off.device, "pin_memory": pin_memory(off, accelerator)}
    if off.device == "nvme":
        section["nvme_path"] = off.nvme_path
    return section
