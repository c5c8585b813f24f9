"""Counters and gauges shared by the pipeline stages, read by logs, `/status` and `/metrics`."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Plain counters; every reject, drop and late delta lands here with its reason (G6)."""

    started_at: float = field(default_factory=time.time)
    received: int = 0
    counted: int = 0
    redelivered_skipped: int = 0
    acked: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    chunks_committed: int = 0
    checkpoints: int = 0
    snapshots_written: int = 0
    batches_sent: int = 0
    batches_failed: int = 0
    chunks_sent: int = 0
    bytes_sent: int = 0
    mqtt_connected: bool = False
    mqtt_reconnects: int = 0
    last_forward_ok: float | None = None
    last_forward_error: str | None = None
    throttled: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    compacted_chunks: int = 0
    buffer_usage: float = 0.0
    buffer_full: bool = False
    dead_letters: int = 0
    # Recent batch round trips, for the latency figures in /status and /metrics.
    batch_latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


class RateLimitedLog:
    """Log a repeated warning at most once per `interval_s` per key, with the suppressed count."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: object, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            self._log.warning(msg + " (%d similar suppressed)", *args, n)
        else:
            self._log.warning(msg, *args)
