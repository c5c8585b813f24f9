"""Every reason a counter is labelled with, so /metrics shows each at 0 from the start: a rate()
or an alert on a reason that has not happened yet still finds its series.

A reason counted that is not listed here still appears (with its count); the test in
tests/ops/test_monitoring.py fails when the code counts one that is missing here.
"""

from __future__ import annotations

from enum import StrEnum


class Reject(StrEnum):
    """Why a message was not counted, one name each: Stats.rejects,
    edge_agent_messages_rejected_total{reason}, /status ingest.rejects and docs/reference.md's
    list. Each is counted once, in Stats.rejects, by whoever decides it."""

    # The topic (TopicRouter.route).
    unknown_topic = "unknown_topic"
    bad_camera_id = "bad_camera_id"
    bad_stream_id = "bad_stream_id"
    bad_topic_encoding = "bad_topic_encoding"
    # The payload (Intake).
    oversized = "oversized"
    malformed_json = "malformed_json"
    not_an_object = "not_an_object"
    too_many_fields = "too_many_fields"
    too_deep = "too_deep"
    internal_error = "internal_error"
    ignored_at_shutdown = "ignored_at_shutdown"
    # Time (timekeeping.CameraClocks via Intake).
    bad_time_dropped = "bad_time_dropped"
    # The windows (Aggregator.add).
    late_dropped = "late_dropped"
    too_many_cameras = "too_many_cameras"
    too_many_streams = "too_many_streams"
    too_many_open_windows = "too_many_open_windows"


class OutboxEvent(StrEnum):
    """What happened to the outbox (not to a message): Stats.outbox_events,
    edge_agent_outbox_events_total{kind}, /status outbox.events."""

    checkpoint_failed = "checkpoint_failed"  # a transaction, not a message
    outbox_corrupt_moved_aside = "outbox_corrupt_moved_aside"  # at start
    snapshot_unreadable = "snapshot_unreadable"  # at start, an open-window snapshot


# edge_agent_messages_rejected_total{reason} (Stats.rejects)
REJECT_REASONS: tuple[str, ...] = tuple(sorted(r.value for r in Reject))

# edge_agent_outbox_events_total{kind} (Stats.outbox_events)
OUTBOX_EVENTS: tuple[str, ...] = tuple(sorted(e.value for e in OutboxEvent))

# edge_agent_dropped_total{reason} (Stats.drops)
DROP_REASONS = ("buffer_full_oldest_chunks", "buffer_full_oldest_messages")

# edge_agent_aggregate_events_total{kind} (Aggregator.counters)
AGGREGATE_EVENTS = (
    "bad_categorical_field",
    "bad_numeric_field",
    "cameras_forgotten_at_cap",
    "late_deltas",
)

# edge_agent_clock_events_total{kind} (CameraClocks.counters)
CLOCK_EVENTS = (
    "bad_time_restamped",
    # An unparseable timestamp: the message counted on the gateway clock (Intake).
    "bad_timestamp_used_gateway_time",
    "clock_gateway_time",
    "clock_jumps",
    "clock_restamped",
    # The cameras' consensus found the gateway's own clock off (and, later, right again).
    "gateway_clock_distrusted",
    "gateway_clock_trusted",
)
