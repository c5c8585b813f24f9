"""Fault points for crash tests: die by SIGKILL at a named point of the pipeline.

Armed only through the environment variable EDGE_AGENT_TEST_FAULT="<point>[:<n>]" (die the n-th
time the point is reached, default 1), read once by the CLI. Unset, every call is a no-op.

Points: `mid_checkpoint` (inside the checkpoint transaction, before COMMIT), `after_commit`
(checkpoint committed, acks not yet sent), `after_send` (the cloud answered 2xx, the outbox
delete not yet done); `stall_checkpoint` does not kill but hangs the checkpoint loop (for the
watchdog test).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "EDGE_AGENT_TEST_FAULT"
POINTS = ("mid_checkpoint", "after_commit", "after_send", "stall_checkpoint")


class Faults:
    def __init__(self, point: str | None = None, nth: int = 1) -> None:
        if point is not None and point not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {point!r}; known: {', '.join(POINTS)}")
        self._point = point
        self._left = nth

    @classmethod
    def from_env(cls) -> Faults:
        raw = os.environ.get(ENV)
        if not raw:
            return cls()
        point, _, n = raw.partition(":")
        return cls(point, int(n or 1))

    def reached(self, point: str) -> bool:
        """True the n-th time `point` is reached (and every time after)."""
        if point != self._point:
            return False
        self._left -= 1
        return self._left <= 0

    def hit(self, point: str) -> None:
        if self.reached(point):
            log.warning("fault point %s reached: SIGKILL", point)
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = Faults()
