"""Fault points for crash tests: die by SIGKILL at a named point of the pipeline.

A test hook, read from the environment: armed only through the variable
EDGE_AGENT_TEST_FAULT="<point>[:<n>]" (die the n-th time the point is reached, default 1), read
once by `run` (and checked by `check-config`). Unset or empty, every call is a no-op; any other
value that is not a point below is a config error (exit 2), never a traceback. Whoever can set
the agent's environment can make it kill itself with this: keep it out of a production unit.

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
        """The faults EDGE_AGENT_TEST_FAULT arms; ValueError, a `config error:` line, for a
        value that is not "<point>[:<n>]"."""
        raw = os.environ.get(ENV)
        if not raw:
            return cls()
        point, colon, n = raw.partition(":")
        if point not in POINTS or (colon and not (n.isascii() and n.isdigit() and int(n) >= 1)):
            raise ValueError(
                f"{ENV} = {raw!r}: a crash-test hook; expected <point>[:<n>], a point of "
                f"{', '.join(POINTS)} and n >= 1, or unset"
            )
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
