"""Every reason a counter is labelled with, so /metrics shows each at 0 from the start: a rate()
or an alert on a reason that has not happened yet still finds its series.

A reason counted that is not listed here still appears (with its count); the test in
tests/test_metrics_hygiene.py fails when the code counts one that is missing here.
"""

from __future__ import annotations

# edge_agent_messages_rejected_total{reason} (Stats.rejects)
REJECT_REASONS = (
    "bad_camera_id",
    "bad_stream_id",
    "bad_time_dropped",
    "bad_timestamp_used_gateway_time",
    "bad_topic_encoding",
    "checkpoint_failed",
    "ignored_at_shutdown",
    "internal_error",
    "late_dropped",
    "malformed_json",
    "not_an_object",
    "outbox_corrupt_moved_aside",
    "oversized",
    "snapshot_unreadable",
    "too_deep",
    "too_many_cameras",
    "too_many_fields",
    "too_many_open_windows",
    "too_many_streams",
    "unknown_topic",
)

# edge_agent_dropped_total{reason} (Stats.drops)
DROP_REASONS = ("buffer_full_oldest_chunks", "buffer_full_oldest_messages")

# edge_agent_aggregate_events_total{kind} (Aggregator.counters)
AGGREGATE_EVENTS = (
    "bad_categorical_field",
    "bad_numeric_field",
    "cameras_forgotten_at_cap",
    "late_deltas",
    "late_dropped",
)

# edge_agent_clock_events_total{kind} (Clocks.counters)
CLOCK_EVENTS = (
    "bad_time_dropped",
    "bad_time_restamped",
    "clock_gateway_time",
    "clock_jumps",
    "clock_restamped",
)
