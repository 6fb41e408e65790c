"""Preemption and time-limit warnings: a signal sets a flag; all ranks agree on it at a step boundary.

No collective ever runs inside a signal handler: the handler only records the signal. The trainer calls
`stop_requested()` once per step, which all-reduces the flag so every rank stops (and saves) at the same step,
even though the scheduler signalled only some of them.

The two signals mean different things to a launcher: SIGUSR2 is the scheduler's warning before a time limit or a
preemption ("save, then requeue me"); SIGTERM alone is the end (scancel, or a preemption that Slurm requeues by
itself). When ranks saw different ones, the warning wins; `stopped_by()` tells the launcher which one all ranks
agreed on (the Slurm job requeues only on SIGUSR2).
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)  # highest priority first

_stopped_by: signal.Signals | None = None  # per process, like the signal dispositions themselves


def _priority(signum: int | None) -> int:
    """0 for no signal, else higher for signals earlier in STOP_SIGNALS (USR2 = 2, TERM = 1)."""
    return 0 if signum is None else len(STOP_SIGNALS) - STOP_SIGNALS.index(signum)


class StopFlag:
    def __init__(self, device: torch.device):
        global _stopped_by
        _stopped_by = None
        self.device = device
        self.received: int | None = None  # the highest-priority stop signal this process got
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if _priority(signum) > _priority(self.received):
            self.received = signum

    def stop_requested(self) -> bool:
        global _stopped_by
        flag = torch.tensor([float(_priority(self.received))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed:
            _stopped_by = signal.Signals(STOP_SIGNALS[len(STOP_SIGNALS) - agreed])
        return agreed > 0


def stopped_by() -> signal.Signals | None:
    """The stop signal all ranks agreed on in this process's last training run, or None if it was not stopped."""
    return _stopped_by
