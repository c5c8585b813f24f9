"""The two clocks of the agent: wall time only stamps, monotonic time measures.

Durations and timers (idle close, max_ack_delay, late memory, backoff, pacing) run on the
monotonic clock, so a step of the gateway's wall clock neither stalls nor fires them. The wall
clock stamps receive times, `created_at` and `sent_at`. The simulation passes its own clock.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float:
        """Seconds since the epoch (may step)."""
        ...

    def mono(self) -> float:
        """Seconds on a clock that never steps."""
        ...


class SystemClock:
    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()


class StepWatch:
    """Notices steps of the wall clock against the monotonic clock (the gateway's own clock).

    `observe` returns the step in seconds when wall - mono moved by more than `threshold_s`
    since the last observation, else 0.0.
    """

    def __init__(self, threshold_s: float = 2.0) -> None:
        self.threshold_s = threshold_s
        self._offset: float | None = None
        self.steps = 0

    def observe(self, wall: float, mono: float) -> float:
        offset = wall - mono
        prev = self._offset
        self._offset = offset
        if prev is None:
            return 0.0
        step = offset - prev
        if abs(step) > self.threshold_s:
            self.steps += 1
            return step
        # Follow slow drift (NTP slewing) without calling it a step.
        return 0.0
