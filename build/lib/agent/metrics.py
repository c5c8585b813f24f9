"""/metrics: the pipeline's figures in the Prometheus text format (prometheus-client exposition).

A collector reads the live counters at scrape time, so nothing is counted twice. Labels have
bounded cardinality: reasons, never camera ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.stats import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from agent.service import Pipeline

P = "edge_agent_"
SKEW_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)


class PipelineCollector(Collector):
    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline

    def collect(self) -> Iterator[Metric]:
        p = self._p
        st, ob = p.stats, p.outbox

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(P + name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(P + name, doc, value=value)

        yield gauge("up_seconds", "Seconds since the agent started.", time.time() - st.started_at)
        yield gauge("mqtt_connected", "1 while connected and subscribed.", float(st.mqtt_connected))
        yield counter("mqtt_reconnects", "MQTT reconnections.", st.mqtt_reconnects)
        yield counter("messages_received", "MQTT messages received.", st.received)
        yield counter("messages_counted", "Messages counted into windows.", st.counted)
        yield counter(
            "messages_redelivered_skipped",
            "Redeliveries of already counted messages, acked without counting.",
            st.redelivered_skipped,
        )
        yield counter("messages_acked", "PUBACKs sent after the effect was committed.", st.acked)
        yield gauge("messages_unacked", "Messages received and not yet acked.", len(p.ledger))
        rejects = CounterMetricFamily(
            P + "messages_rejected", "Messages rejected, by reason.", labels=["reason"]
        )
        for reason, n in sorted(st.rejects.items()):
            rejects.add_metric([reason], n)
        yield rejects
        agg = CounterMetricFamily(
            P + "aggregate_events", "Late deltas, late drops, bad fields.", labels=["kind"]
        )
        for kind, n in sorted(p.aggregator.counters.items()):
            agg.add_metric([kind], n)
        yield agg
        yield gauge("cameras", "Cameras tracked.", p.aggregator.camera_count)
        clocks = p.clocks.items()
        yield gauge(
            "cameras_clock_suspect",
            "Cameras whose clock skew exceeds max_skew_s.",
            sum(c.suspect for _, c in clocks),
        )
        skews = [abs(c.skew_s) for _, c in clocks if c.skew_s is not None]
        yield HistogramMetricFamily(
            P + "camera_clock_skew_abs_seconds",
            "Absolute clock skew estimate of each camera (one observation per camera).",
            buckets=[(f"{b:g}", float(sum(s <= b for s in skews))) for b in SKEW_BUCKETS_S]
            + [("+Inf", float(len(skews)))],
            sum_value=sum(skews),
        )
        clock_events = CounterMetricFamily(
            P + "clock_events", "Clock jumps, restamps, bad times.", labels=["kind"]
        )
        for kind, n in sorted(p.clocks.counters.items()):
            clock_events.add_metric([kind], n)
        yield clock_events
        yield gauge("windows_open", "Open aggregation windows.", p.aggregator.open_count)
        yield counter("checkpoints", "Checkpoint transactions committed.", st.checkpoints)
        yield counter("chunks_committed", "Chunks written to the outbox.", st.chunks_committed)
        yield counter("snapshots_written", "Open windows saved to ack early.", st.snapshots_written)
        yield gauge("outbox_chunks", "Chunks waiting in the outbox.", ob.chunk_count)
        yield gauge("outbox_bytes", "Bytes of chunk JSON waiting.", ob.chunk_bytes)
        yield gauge("outbox_file_bytes", "Outbox database plus WAL on disk.", ob.file_bytes())
        yield gauge("outbox_usage_ratio", "Live outbox pages / buffer.max_bytes.", st.buffer_usage)
        yield gauge("outbox_full", "1 while the outbox is full (acks held).", float(st.buffer_full))
        oldest = ob.oldest_created_at
        yield gauge(
            "outbox_oldest_age_seconds",
            "Age of the oldest unsent chunk (0 when empty).",
            time.time() - oldest if oldest else 0.0,
        )
        yield counter(
            "chunks_compacted", "Chunks merged away into coarser windows.", st.compacted_chunks
        )
        drops = CounterMetricFamily(P + "dropped", "Data dropped, by reason.", labels=["reason"])
        for reason, n in sorted(st.drops.items()):
            drops.add_metric([reason], n)
        yield drops
        yield counter("dead_letters", "Chunks the cloud refused for good.", st.dead_letters)
        yield counter("batches_sent", "Batches acknowledged by the cloud.", st.batches_sent)
        yield counter("batches_failed", "Batch attempts that failed.", st.batches_failed)
        yield counter("chunks_sent", "Chunks acknowledged by the cloud.", st.chunks_sent)
        yield counter("bytes_sent", "Request body bytes acknowledged.", st.bytes_sent)
        yield counter("throttled", "429/503 answers.", st.throttled)
        yield gauge("forward_pace_chunks_per_second", "Current send pace.", p.forwarder.pacer.rate)
        last_ok = st.last_forward_ok
        yield gauge(
            "forward_last_success_age_seconds",
            "Seconds since the cloud last acknowledged a batch (-1: never).",
            time.time() - last_ok if last_ok else -1.0,
        )
        yield HistogramMetricFamily(
            P + "batch_latency_seconds",
            "Round trip of a batch POST.",
            buckets=[
                (f"{b:g}", float(c))
                for b, c in zip(LATENCY_BUCKETS_S, st.latency_counts, strict=True)
            ]
            + [("+Inf", float(st.latency_n))],
            sum_value=st.latency_sum_s,
        )


def render(pipeline: Pipeline) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(pipeline))
    return generate_latest(registry)
