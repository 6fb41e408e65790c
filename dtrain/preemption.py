"""Preemption and time-limit warnings: a signal sets a flag; all ranks agree on it at a step boundary.

No collective ever runs inside a signal handler: the handler only records the signal. The trainer calls
`stop_requested()` once per step, which all-reduces the flag so every rank stops (and saves) at the same step,
even though the scheduler signalled only some of them.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
