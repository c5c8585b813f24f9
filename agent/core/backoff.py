"""Capped exponential backoff with full jitter: the MQTT reconnects and the forwarder's
retries both wait this way."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, *, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.max_s, self.min_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self._rng.uniform(self.min_s / 2, cap)

    def reset(self) -> None:
        self.attempt = 0
