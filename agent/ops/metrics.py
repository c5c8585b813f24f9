"""/metrics: the pipeline's figures in the Prometheus text format (prometheus-client exposition).

A collector reads the live counters at scrape time, so nothing is counted twice. Labels have
bounded cardinality: reasons, never camera ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import agent.core.buildinfo as buildinfo
from agent.core.reasons import (
    AGGREGATE_EVENTS,
    CLOCK_EVENTS,
    DROP_REASONS,
    OUTBOX_EVENTS,
    REJECT_REASONS,
)
from agent.core.stats import LATENCY_BUCKETS_S
from agent.ops.figures import FIGURES
from agent.ops.status import SILENT_AFTER_S, ready_problems

if TYPE_CHECKING:
    from agent.ops.pipeline import Pipeline

P = "edge_agent_"


def build_info(gateway_id: str) -> dict[str, str]:
    """The labels of edge_agent_build_info: the one place that says which gateway and build
    this is. Only this series carries gateway_id: a central Prometheus joins it onto the others
    by instance (docs/operating.md, "Monitoring shipped")."""
    return {"gateway_id": gateway_id, **buildinfo.labels()}


def _with_zeros(counts: Mapping[str, int], known: Iterable[str]) -> list[tuple[str, int]]:
    """Every known reason (0 if it never happened) plus any other counted, sorted."""
    return sorted({**dict.fromkeys(known, 0), **counts}.items())


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

        now = time.time()
        yield InfoMetricFamily(
            P + "build",
            "The gateway (gateway_id), the agent's version and commit.",
            value=build_info(p.settings.gateway_id),
        )
        yield gauge("start_time_seconds", "When the agent started (unix time).", st.started_at)
        yield gauge("ready", "1 when /readyz answers 200.", float(not ready_problems(p)))
        # The plain figures, from the one table /status uses too.
        for f in FIGURES:
            if f.metric is not None:
                make = counter if f.kind == "counter" else gauge
                yield make(f.metric, f.help, float(f.get(p)))
        rejects = CounterMetricFamily(
            P + "messages_rejected", "Messages rejected, by reason.", labels=["reason"]
        )
        for reason, n in _with_zeros(st.rejects, REJECT_REASONS):
            rejects.add_metric([reason], n)
        yield rejects
        outbox_events = CounterMetricFamily(
            P + "outbox_events",
            "Outbox events: failed checkpoint transactions, a corrupt file moved aside at start, "
            "unreadable open-window snapshots.",
            labels=["kind"],
        )
        for kind, n in _with_zeros(st.outbox_events, OUTBOX_EVENTS):
            outbox_events.add_metric([kind], n)
        yield outbox_events
        agg = CounterMetricFamily(
            P + "aggregate_events", "Late deltas, late drops, bad fields.", labels=["kind"]
        )
        for kind, n in _with_zeros(p.aggregator.counters, AGGREGATE_EVENTS):
            agg.add_metric([kind], n)
        yield agg
        active, silent = p.aggregator.camera_activity(time.monotonic(), SILENT_AFTER_S)
        yield gauge("cameras", "Cameras remembered (an hour after their last message).",
                    p.aggregator.camera_count)  # fmt: skip
        yield gauge("cameras_active", f"Cameras heard from within {SILENT_AFTER_S:g} s.", active)
        yield gauge(
            "cameras_silent",
            f"Cameras remembered, silent for {SILENT_AFTER_S:g} s or more.",
            silent,
        )
        clocks = p.clocks.items()
        yield gauge(
            "cameras_clock_suspect",
            "Cameras whose clock skew exceeds max_skew_s.",
            sum(c.suspect for _, c in clocks),
        )
        skews = [abs(c.skew_s) for _, c in clocks if c.skew_s is not None]
        yield gauge(
            "cameras_clock_skew_max_abs_seconds",
            "Largest absolute clock skew estimate among the cameras (0 when none).",
            max(skews, default=0.0),
        )
        yield gauge(
            "cameras_clock_skew_max_allowed_seconds",
            "aggregate.max_skew_s: a camera beyond it is clock suspect.",
            p.settings.aggregate.max_skew_s,
        )
        clock_events = CounterMetricFamily(
            P + "clock_events", "Clock jumps, restamps, bad times.", labels=["kind"]
        )
        for kind, n in _with_zeros(p.clocks.counters, CLOCK_EVENTS):
            clock_events.add_metric([kind], n)
        yield clock_events
        oldest = ob.oldest_created_at
        yield gauge(
            "outbox_oldest_age_seconds",
            "Age of the oldest unsent chunk (0 when empty).",
            now - oldest if oldest else 0.0,
        )
        drops = CounterMetricFamily(P + "dropped", "Data dropped, by reason.", labels=["reason"])
        for reason, n in _with_zeros(st.drops, DROP_REASONS):
            drops.add_metric([reason], n)
        yield drops
        yield gauge(
            "forward_last_success_timestamp_seconds",
            "When the cloud last acknowledged a batch (unix time; 0: not since the start).",
            st.last_forward_ok or 0.0,
        )
        yield gauge(
            "forward_failing_since_timestamp_seconds",
            "Since when the cloud has not acknowledged (unix time; 0: not failing).",
            st.forward_failing_since or 0.0,
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
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, _resident_memory_bytes...
    return generate_latest(registry)
