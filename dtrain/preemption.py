"""Preemption and time-limit warnings: a signal sets a flag; all ranks agree on it at a step boundary.

No collective ever runs inside a signal handler: the handler only records the signal. Once per step the trainer
all-reduces every rank's `votes()` (in the same collective as the step's loss) and calls `agree()`, so every rank
stops (and saves) at the same step, even though the scheduler signalled only some of them.

The two signals mean different things to a launcher: SIGUSR2 is the scheduler's warning before a time limit or a
preemption ("save, then requeue me"); SIGTERM alone is the end (scancel, or a preemption that Slurm requeues by
itself). When ranks saw different ones, the warning wins; `stopped_by()` tells the launcher which one all ranks
agreed on (the Slurm job requeues only on SIGUSR2).

A preemption comes as SIGTERM then SIGUSR2, from two separate scancel/slurmctld round trips (what submitit's
`_interrupt` sends); a step boundary can fall between them. So a stop agreed on SIGTERM alone is confirmed by
`settle()` after the save: it waits until USR2_GRACE_S after the SIGTERM and votes once more (seen in CI: a 2-node
job stopped early instead of requeueing). Slurm kills only KillWait (30 s by default) after SIGTERM.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)  # highest priority first

USR2_GRACE_S = 2.0
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
        self.first_at: float | None = None  # time.monotonic() of the first stop signal
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if _priority(signum) > _priority(self.received):
            self.received = signum
        if self.first_at is None:
            self.first_at = time.monotonic()

    def votes(self) -> torch.Tensor:
        """This rank's vote, one count per stop signal (highest priority first), to be SUM-all-reduced together with
        the step's other values: one collective and one host sync per step carry the loss and the stop flag."""
        return torch.tensor([float(self.received == sig) for sig in STOP_SIGNALS], device=self.device)

    def agree(self, summed_votes: list[float]) -> bool:
        """Whether to stop, from the votes summed over all ranks: the highest-priority signal any rank got wins."""
        global _stopped_by
        signals = [sig for sig, count in zip(STOP_SIGNALS, summed_votes, strict=True) if count > 0]
        if signals:
            _stopped_by = signals[0]
        return bool(signals)

    def stop_requested(self) -> bool:
        """agree() over a collective of its own, for callers outside the training step."""
        votes = self.votes()
        dist.all_reduce(votes)
        return self.agree(votes.tolist())

    def settle(self) -> None:
        """Collective, on every rank once a stop was agreed and saved: if all agreed on SIGTERM alone, wait until
        USR2_GRACE_S after this rank's first signal and agree again: a SIGUSR2 just behind the SIGTERM still wins."""
        if _stopped_by != signal.SIGTERM:
            return
        if self.first_at is not None:
            time.sleep(max(0.0, self.first_at + USR2_GRACE_S - time.monotonic()))
        self.stop_requested()


def ignore_further_stops() -> None:
    """Once a stop is agreed and saved, a later stop signal has nothing left to act on; ignore it. The StopFlag's
    handler would do that too, but Python resets handlers it installed to the default (die) while the interpreter
    shuts down, and torchrun sends SIGTERM to the ranks still running as soon as one exits EXIT_PREEMPTED: a rank
    that saved and was exiting died of it (SIG_IGN is kept through the shutdown)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stopped_by() -> signal.Signals | None:
    """The stop signal all ranks agreed on in this process's last training run, or None if it was not stopped."""
    return _stopped_by
