"""Config section of DeepSpeed: the ZeRO stage, what is offloaded where, bucket sizes; and the rule which stage and
offload combinations exist (`zero_layout_problems`), used here, by `dtrain plan` and by its tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
ZERO_STAGES = (0, 1, 2, 3)


def zero_layout_problems(stage: int, offload_optimizer: str, offload_param: str) -> list[str]:
    """What DeepSpeed cannot run: parameter offload below stage 3, optimizer offload at stage 0."""
    problems = []
    if stage not in ZERO_STAGES:
        problems.append(f"deepspeed.stage: must be 0, 1, 2 or 3, got {stage}")
    if offload_param != "none" and stage != 3:
        problems.append(f"deepspeed.offload_param.device: parameter offload needs deepspeed.stage 3, got {stage}")
    if offload_optimizer != "none" and stage == 0:
        problems.append("deepspeed.offload_optimizer.device: optimizer offload needs deepspeed.stage >= 1")
    return problems


def optimizer_states_problems(states: str, precision: str, optimizer: str, offload_optimizer: str) -> list[str]:
    """bf16 optimizer states: DeepSpeed 0.19.8 keeps them only with bf16 master weights and gradients, and with an
    offloaded optimizer only in its CPU Adam built with fp32_optimizer_states=False (base_optimizer.py
    _configure_master_weights); the GPU path (fused Adam, no offload) is not tested here, so it is not offered. With
    the optimizer on NVMe the first step fails an assert (`dtype == self.dtype`, swap_tensor/utils.py:202, from
    partitioned_optimizer_swapper.py:81): bf16 states need the optimizer in CPU RAM."""
    if states != "bf16":
        return []
    needs = [
        f"train.precision bf16 (got {precision})" if precision != "bf16" else "",
        f"train.optimizer adamw_deepspeed (got {optimizer})" if optimizer != "adamw_deepspeed" else "",
        f"deepspeed.offload_optimizer.device cpu (got {offload_optimizer})" if offload_optimizer != "cpu" else "",
    ]
    needs = [n for n in needs if n]
    return [f"train.optimizer_states: bf16 needs {', '.join(needs)}"] if needs else []


def precision_stage_problems(precision: str, stage: int) -> list[str]:
    """bf16 at ZeRO stage 0: DeepSpeed 0.19.8 updates the bf16 weights with no fp32 master copy and sums micro-batch
    gradients in bf16 (engine._do_optimizer_sanity_check: DDP_BFLOAT16; it refuses grad_accum_dtype fp32 there)."""
    if precision == "bf16" and stage == 0:
        return [
            "deepspeed.stage: bf16 at stage 0 trains the bf16 weights with no fp32 master copy and accumulates "
            "gradients in bf16 (DeepSpeed refuses fp32 accumulation at stage 0); use stage 1 — on one GPU it "
            "partitions nothing, and DeepSpeed then keeps fp32 master weights and accumulates in fp32"
        ]
    return []


@dataclass
class OffloadConfig:
    device: Literal["none", "cpu", "nvme"] = "none"
    """Where the state lives between uses."""
    nvme_path: str | None = None
    """Directory on a local NVMe drive (device: nvme)."""
    pin_memory: bool | None = None
    """Page-locked host buffers: faster GPU transfers, more host memory pinned. null: pinned on CUDA, off on a
    CPU-only host (where pinning only locks RAM)."""

    def problems(self, key: str) -> list[str]:
        if self.device == "nvme" and not self.nvme_path:
            return [f"{key}.nvme_path: required when {key}.device is nvme"]
        if self.device != "nvme" and self.nvme_path:
            return [f"{key}.nvme_path: only used with device nvme (device is {self.device})"]
        return []


@dataclass
class DeepSpeedConfig:
    stage: int = 3
    """ZeRO stage: 0 plain data parallel, 1 optimizer, 2 +gradients, 3 +parameters partitioned."""
    offload_optimizer: OffloadConfig = field(default_factory=OffloadConfig)
    """Optimizer state offload (stage >= 1)."""
    offload_param: OffloadConfig = field(default_factory=OffloadConfig)
    """Parameter offload (stage 3 only)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of parameters prefetched ahead of use (stage 3)."""
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this many elements stay unpartitioned (stage 3)."""
    stage3_max_live_parameters: int = 1_000_000_000
    """Upper bound of gathered parameter elements alive at once (stage 3)."""
    timeout_minutes: int = 30
    """Collective timeout of the process group."""

    def problems(self) -> list[str]:
        problems = zero_layout_problems(self.stage, self.offload_optimizer.device, self.offload_param.device)
        problems += self.offload_optimizer.problems("deepspeed.offload_optimizer")
        problems += self.offload_param.problems("deepspeed.offload_param")
        for name in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters"):
            if getattr(self, name) < 1:
                problems.append(f"deepspeed.{name}: must be >= 1")
        if self.stage3_param_persistence_threshold < 0:
            problems.append("deepspeed.stage3_param_persistence_threshold: must be >= 0")
        if self.timeout_minutes < 1:
            problems.append("deepspeed.timeout_minutes: must be >= 1")
        return problems
