"""Config section of the optimization: batch, schedule, optimizer, precision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dtrain.config.typed import one_of
from dtrain.tables import OPTIMIZERS, TRAINING_PRECISIONS


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward."""
    gradient_accumulation_steps: int | None = None
    """Micro batches per optimizer step; exclusive with global_batch_size."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; accumulation is derived from it and the world size."""
    lr: float = 2e-5
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of decay, as a fraction of lr."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    max_steps: int | None = None
    """Optimizer steps to run; exclusive with epochs."""
    epochs: float | None = None
    """Passes over the training data; exclusive with max_steps."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping; 0 disables."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW beta1, beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    optimizer: str = "adamw_torch"
    """adamw_torch: torch AdamW, bitwise-exact resume; adamw_deepspeed: DeepSpeed's fused/CPU Adam (fastest with
    offload); adamw_8bit / paged_adamw_8bit / paged_adamw_32bit: bitsandbytes optimizers (lora/qlora)."""
    seed: int = 42
    """Seeds model init of new modules, data order, dropout."""
    precision: str = "bf16"
    """Training precision: bf16 (fp32 master weights in the optimizer) or fp32."""
    optimizer_states: str = "fp32"
    """fp32: fp32 master weights, gradients and Adam moments (16 B per trained parameter with the bf16 weight).
    bf16: all three in bf16 (DeepSpeed's bf16_master_weights_and_grads + bf16_optimizer_states, 8 B): for offloaded
    optimizers that do not fit host RAM otherwise; needs precision bf16, adamw_deepspeed and optimizer offload to cpu
    (DeepSpeed 0.19.8 fails with it on NVMe). Its loss gap to fp32 states is in docs/nvme-optimizer.md."""

    def problems(self) -> list[str]:
        return self._batch_problems() + self._schedule_problems() + self._optimizer_problems()

    def _batch_problems(self) -> list[str]:
        problems = []
        if self.micro_batch_size < 1:
            problems.append(f"train.micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        if (self.gradient_accumulation_steps is None) == (self.global_batch_size is None):
            problems.append("train.gradient_accumulation_steps / train.global_batch_size: set exactly one")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            problems.append(f"train.gradient_accumulation_steps: must be >= 1, got {self.gradient_accumulation_steps}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            problems.append(f"train.global_batch_size: must be >= 1, got {self.global_batch_size}")
        return problems

    def _schedule_problems(self) -> list[str]:
        problems = []
        if (self.max_steps is None) == (self.epochs is None):
            problems.append("train.max_steps / train.epochs: set exactly one")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"train.max_steps: must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            problems.append(f"train.epochs: must be > 0, got {self.epochs}")
        if self.lr <= 0:
            problems.append(f"train.lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            problems.append(f"train.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            problems.append(f"train.warmup_steps: {self.warmup_steps} exceeds train.max_steps {self.max_steps}")
        if self.seed < 0 or self.seed >= 2**32:
            problems.append(f"train.seed: must be in [0, 2^32) (numpy's seed range), got {self.seed}")
        return problems

    def _optimizer_problems(self) -> list[str]:
        problems = one_of("train.optimizer", self.optimizer, OPTIMIZERS)
        problems += one_of("train.precision", self.precision, TRAINING_PRECISIONS)
        problems += one_of("train.optimizer_states", self.optimizer_states, ("fp32", "bf16"))
        if self.max_grad_norm < 0:
            problems.append(f"train.max_grad_norm: must be >= 0 (0 disables), got {self.max_grad_norm}")
        if self.weight_decay < 0:
            problems.append(f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            problems.append(f"train.adam_betas: expected two numbers in [0, 1), got {self.adam_betas}")
        if self.adam_eps <= 0:
            problems.append(f"train.adam_eps: must be > 0, got {self.adam_eps}")
        return problems
