"""Where a rank's startup goes: seconds from the process's start to its first optimizer step, by phase.

The first phase runs from the moment the OS started the rank's process (not from the first line of Python), so
interpreter start, imports and joining the process group are all counted: the total is what a user waits for.
"""

from __future__ import annotations

import time

import psutil


class StartupClock:
    def __init__(self) -> None:
        self._last = psutil.Process().create_time()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """`phase` ended now; it began where the previous one ended."""
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def line(self) -> str:
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.phases.items())
        return f"startup {sum(self.phases.values()):.2f} s: {parts}"
