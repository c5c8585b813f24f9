"""Counters and gauges shared by the pipeline stages, read by logs, `/status` and `/metrics`."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Stats:
    """Plain counters; every reject, drop and late delta lands here with its reason."""

    started_at: float = field(default_factory=time.time)
    received: int = 0
    counted: int = 0
    redelivered_skipped: int = 0
    # DUP deliveries recognised as a broker's replay of an older snapshot (agent/intake/acks.py).
    replays_skipped: int = 0
    acked: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    # agent/core/reasons.py OutboxEvent: failed checkpoints, a corrupt file moved aside...
    outbox_events: Counter[str] = field(default_factory=Counter)
    chunks_committed: int = 0
    checkpoints: int = 0
    snapshots_written: int = 0
    batches_sent: int = 0
    batches_failed: int = 0
    chunks_sent: int = 0
    bytes_sent: int = 0
    mqtt_connected: bool = False
    mqtt_reconnects: int = 0
    mqtt_connected_since: float | None = None
    # Failed connects and lost connections (reconnect attempts), and since when MQTT is down.
    mqtt_connect_failures: int = 0
    mqtt_down_since: float | None = None
    # The broker's CONNACK refusal ("broker refused: not authorized (135)") until a connect works.
    mqtt_refused: str | None = None
    # Connects that found no session at the broker though the agent had one (the broker
    # restarted without persistence, or the session expired): what the broker took for us
    # while no subscription existed is gone. The last one's time (wall clock).
    mqtt_sessions_lost: int = 0
    mqtt_session_lost_at: float | None = None
    # The agent holds mqtt.receive_maximum unacked messages (acks cannot go out: the outbox's
    # disk fails, or it is full): it reads no more from the broker until it can ack.
    intake_paused: bool = False
    intake_pauses: int = 0
    # SUBACK refusals and QoS downgrades of the current connection, one line per topic.
    subscription_problems: list[str] = field(default_factory=list)
    last_forward_ok: float | None = None
    # The last failure and when it happened (wall clock); both cleared by the next success.
    last_forward_error: str | None = None
    last_forward_error_at: float | None = None
    # When the cloud stopped acknowledging (the first failure since the last success), and how
    # many attempts have failed since: an outage's start, for alerts and the recovery line.
    forward_failing_since: float | None = None
    forward_failures_in_row: int = 0
    throttled: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    compacted_chunks: int = 0
    buffer_usage: float = 0.0
    dead_letters: int = 0
    gateway_clock_steps: int = 0
    outbox_errors: int = 0
    # Batch round trips: cumulative histogram buckets (seconds) and their sum, for /metrics.
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    latency_sum_s: float = 0.0
    latency_n: int = 0
    # (monotonic time, messages counted) samples, one per checkpoint, for rates over 10/60 s.
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=2400))

    def observe_latency(self, seconds: float) -> None:
        self.latency_sum_s += seconds
        self.latency_n += 1
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.latency_counts[i] += 1

    def sample(self, now_mono: float) -> None:
        self.samples.append((now_mono, self.counted))

    def rate(self, window_s: float, now_mono: float) -> float:
        """Messages counted per second over the last window_s."""
        if not self.samples:
            return 0.0
        newest_t, newest = self.samples[-1]
        base_t, base = newest_t, newest
        for t, n in reversed(self.samples):
            if t < now_mono - window_s:
                break
            base_t, base = t, n
        return (newest - base) / (newest_t - base_t) if newest_t > base_t else 0.0
