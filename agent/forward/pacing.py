"""Waiting policies of the forwarder: Retry-After and the AIMD send pace (its retry backoff is
agent/core/backoff.py, shared with the MQTT reconnects)."""

from __future__ import annotations

import email.utils


def retry_after_s(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


class Pacer:
    """The send pace: at most `rate` chunks/s (and max_bytes_per_s), with an AIMD rate.

    After a batch of n chunks the next may leave n / rate seconds later (no credit is saved up
    while idle, so there is never a burst above the rate). The rate is halved when the cloud
    says 429/503 and grows back by a tenth of the maximum for each batch answered within
    fast_response_s. Pure: `now` is passed in.
    """

    def __init__(
        self,
        *,
        max_chunks_per_s: float,
        min_chunks_per_s: float,
        max_bytes_per_s: float = 0.0,
        fast_response_s: float = 1.0,
    ) -> None:
        self.max_rate = max_chunks_per_s
        self.min_rate = min(min_chunks_per_s, max_chunks_per_s)
        self.rate = max_chunks_per_s
        self.max_bytes_per_s = max_bytes_per_s
        self.fast_response_s = fast_response_s
        self._next = 0.0

    def delay(self, now: float) -> float:
        """Seconds to wait before the next batch may leave."""
        return max(0.0, self._next - now)

    def sent(self, chunks: int, nbytes: int, now: float) -> None:
        spacing = chunks / self.rate
        if self.max_bytes_per_s:
            spacing = max(spacing, nbytes / self.max_bytes_per_s)
        self._next = max(now, self._next) + spacing

    def throttled(self) -> None:
        self.rate = max(self.min_rate, self.rate / 2)

    def answered(self, latency_s: float) -> None:
        if latency_s <= self.fast_response_s:
            self.rate = min(self.max_rate, self.rate + self.max_rate / 10)
