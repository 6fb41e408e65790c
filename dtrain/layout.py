"""Batch arithmetic: micro batch x accumulation x ranks = global batch. Pure, no process group."""

from __future__ import annotations

from dataclasses import dataclass

from dtrain.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @classmethod
    def from_config(cls, train: TrainConfig, world_size: int, global_batch_size: int | None = None) -> BatchLayout:
        """Derive accumulation for this world size. `global_batch_size` (from a checkpoint) overrides the config:
        a run resumed on a different number of ranks keeps its global batch."""
        target = global_batch_size or train.global_batch_size
        if target is None:
            return cls(train.micro_batch_size, train.gradient_accumulation_steps, world_size)
        per_step = train.micro_batch_size * world_size
        if target % per_step:
            origin = "the checkpoint's global batch" if global_batch_size else "train.global_batch_size"
            raise ConfigError(
                [
                    f"train.global_batch_size: {origin} {target} is not a multiple of train.micro_batch_size "
                    f"{train.micro_batch_size} x {world_size} ranks = {per_step}"
                ]
            )
        return cls(train.micro_batch_size, target // per_step, world_size)
