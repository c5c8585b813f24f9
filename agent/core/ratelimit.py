"""Repeated warnings, logged at most once an interval per key, with what was suppressed."""

from __future__ import annotations

import logging
import time
from collections import Counter


class RateLimitedLog:
    """Log a repeated warning at most once per `interval_s` per key, with the suppressed count."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(
        self,
        key: str,
        msg: str,
        *args: object,
        now: float | None = None,
        exc_info: bool = False,
    ) -> None:
        """`exc_info=True` adds the traceback of the exception being handled."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            self._log.warning(msg + " (%d similar suppressed)", *args, n, exc_info=exc_info)
        else:
            self._log.warning(msg, *args, exc_info=exc_info)
