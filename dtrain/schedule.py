"""Learning-rate schedule: linear warmup, then cosine or linear decay to min_lr_ratio, as a LambdaLR factor."""

from __future__ import annotations

import math
from collections.abc import Callable

from dtrain.config import TrainConfig


def lr_factor(train: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup, floor = train.warmup_steps, train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if train.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if train.scheduler == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
