"""The pipeline's plain figures, each defined once: where it sits in /status, its /metrics name,
kind and help, and how to read it. `status.py` and `metrics.py` render from this table, and a
test holds docs/reference.md's /status schema and /metrics list to it.

Figures that are not one plain number (rates over a window, times, reasons, the camera
activity read in one pass, the latency histogram) stay with their renderer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from agent.ops.pipeline import Pipeline

Section = Literal["mqtt", "ingest", "aggregate", "outbox", "forward"]
Kind = Literal["counter", "gauge"]


@dataclass(frozen=True, slots=True)
class Figure:
    section: Section  # the /status section holding it
    key: str  # its key there
    metric: str | None  # edge_agent_<metric> (a counter gets _total); None: /status only
    kind: Kind
    help: str
    get: Callable[[Pipeline], float]
    digits: int | None = None  # /status rounds it to this many decimals


C: Kind = "counter"
G: Kind = "gauge"

FIGURES: tuple[Figure, ...] = (
    Figure("mqtt", "connected", "mqtt_connected", G, "1 while connected and subscribed.",
         lambda p: p.stats.mqtt_connected),
    Figure("mqtt", "reconnects", "mqtt_reconnects", C, "MQTT reconnections that succeeded.",
         lambda p: p.stats.mqtt_reconnects),
    Figure("mqtt", "connect_failures", "mqtt_connect_failures", C,
         "MQTT connects that failed and connections lost (reconnect attempts).",
         lambda p: p.stats.mqtt_connect_failures),
    Figure("mqtt", "sessions_lost", "mqtt_sessions_lost", C,
         "Connects that found no session at the broker though the agent had one.",
         lambda p: p.stats.mqtt_sessions_lost),
    Figure("ingest", "received", "messages_received", C, "MQTT messages received.",
         lambda p: p.stats.received),
    Figure("ingest", "counted", "messages_counted", C, "Messages counted into windows.",
         lambda p: p.stats.counted),
    Figure("ingest", "redelivered_skipped", "messages_redelivered_skipped", C,
         "Redeliveries of already counted messages, acked without counting.",
         lambda p: p.stats.redelivered_skipped),
    Figure("ingest", "replays_skipped", "messages_replays_skipped", C,
         "Messages a broker sent again from an older snapshot of its session, already counted "
         "and acked: acked again, not counted.",
         lambda p: p.stats.replays_skipped),
    Figure("ingest", "possible_doubles", "messages_possible_doubles", C,
         "Redeliveries counted though they may have been counted before: the agent died between "
         "a reconnect and its first new message, and the broker may have begun its packet ids "
         "anew (docs/design.md, The broker restored an older snapshot).",
         lambda p: p.ledger.possible_replays),
    Figure("ingest", "replay_memory", "replay_memory_keys", G,
         "Acked messages remembered to recognise a broker's replay of an older snapshot "
         "(8 bytes each; mqtt.broker_autosave_interval_s).",
         lambda p: p.ledger.remembered),
    Figure("ingest", "acked", "messages_acked", C, "PUBACKs sent after the effect was committed.",
         lambda p: p.stats.acked),
    Figure("ingest", "unacked", "messages_unacked", G, "Messages received and not yet acked.",
         lambda p: len(p.ledger)),
    Figure("ingest", "paused", "intake_paused", G,
         "1 while the agent holds mqtt.receive_maximum unacked messages and reads no more.",
         lambda p: p.stats.intake_paused),
    Figure("ingest", "pauses", "intake_pauses", C,
         "Times the intake paused at mqtt.receive_maximum unacked messages.",
         lambda p: p.stats.intake_pauses),
    Figure("aggregate", "gateway_clock_offset_s", "gateway_clock_offset_seconds", G,
         "The gateway's wall clock minus the cameras' consensus (0: the gateway is trusted).",
         lambda p: p.clocks.gateway_offset, digits=3),
    Figure("aggregate", "windows_open", "windows_open", G, "Open aggregation windows.",
         lambda p: p.aggregator.open_count),
    Figure("outbox", "chunks", "outbox_chunks", G, "Chunks waiting in the outbox.",
         lambda p: p.outbox.chunk_count),
    Figure("outbox", "bytes", "outbox_bytes", G, "Bytes of chunk JSON waiting.",
         lambda p: p.outbox.chunk_bytes),
    Figure("outbox", "file_bytes", "outbox_file_bytes", G, "Outbox database plus WAL on disk.",
         lambda p: p.outbox.file_bytes()),
    Figure("outbox", "usage_of_max_bytes", "outbox_usage_ratio", G,
         "Live outbox pages / buffer.max_bytes.", lambda p: p.stats.buffer_usage, digits=4),
    Figure("outbox", "effective_max_bytes", "outbox_max_bytes", G,
         "The outbox quota in force (effective max bytes).",
         lambda p: p.outbox.effective_max_bytes),
    Figure("outbox", "full", "outbox_full", G, "1 while the outbox is full (acks held).",
         lambda p: p.checkpointer.buffer_full),
    Figure("outbox", "next_seq", None, G, "The seq the next chunk gets.",
         lambda p: p.outbox.last_seq + 1),
    Figure("outbox", "checkpoints", "checkpoints", C, "Checkpoint transactions committed.",
         lambda p: p.stats.checkpoints),
    Figure("outbox", "chunks_committed", "chunks_committed", C, "Chunks written to the outbox.",
         lambda p: p.stats.chunks_committed),
    Figure("outbox", "snapshots_written", "snapshots_written", C,
         "Open windows saved to ack early.", lambda p: p.stats.snapshots_written),
    Figure("outbox", "compacted_chunks", "chunks_compacted", C,
         "Chunks merged away into coarser windows.", lambda p: p.stats.compacted_chunks),
    Figure("outbox", "dead_letters", "outbox_dead_letters", G,
         "Chunks in the dead letters now (deadletter retry lowers it).",
         lambda p: p.outbox.dead_letter_count),
    Figure("outbox", "dead_lettered_total", "dead_letters", C, "Chunks moved to the dead letters.",
         lambda p: p.stats.dead_letters),
    Figure("forward", "batches_sent", "batches_sent", C, "Batches acknowledged by the cloud.",
         lambda p: p.stats.batches_sent),
    Figure("forward", "batches_failed", "batches_failed", C, "Batch attempts that failed.",
         lambda p: p.stats.batches_failed),
    Figure("forward", "chunks_sent", "chunks_sent", C, "Chunks acknowledged by the cloud.",
         lambda p: p.stats.chunks_sent),
    Figure("forward", "bytes_sent", "bytes_sent", C, "Request body bytes acknowledged.",
         lambda p: p.stats.bytes_sent),
    Figure("forward", "failures_in_row", None, G, "Batch attempts failed since the last success.",
         lambda p: p.stats.forward_failures_in_row),
    Figure("forward", "alert_after_s", "forward_alert_after_seconds", G,
         "forward.alert_after_s: an outage or a backlog this old is a problem.",
         lambda p: p.settings.forward.alert_after_s),
    Figure("forward", "outbox_errors", None, C, "Outbox writes of the forwarder that failed.",
         lambda p: p.stats.outbox_errors),
    Figure("forward", "pace_chunks_per_s", "forward_pace_chunks_per_second", G,
         "Current send pace.", lambda p: p.forwarder.pace, digits=1),
    Figure("forward", "throttled", "throttled", C, "429/503 answers.",
         lambda p: p.stats.throttled),
)  # fmt: skip


def status_section(p: Pipeline, section: Section) -> dict[str, float]:
    """The figures of one /status section, as JSON values (a flag stays true/false)."""
    out: dict[str, float] = {}
    for f in FIGURES:
        if f.section == section:
            value = f.get(p)
            out[f.key] = round(value, f.digits) if f.digits is not None else value
    return out
