"""edge-ingest's figures on /metrics, in its own registry (docs/ingest.md lists them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_ingest.store import CAUSES, Store

ANSWERS = ("200", "400", "401", "403", "404", "405", "408", "413", "422", "500", "503")


class Metrics:
    def __init__(self, store: Store) -> None:
        r = self.registry = CollectorRegistry()
        self.batches = Counter(
            "edge_ingest_batches", "Batches answered, by HTTP answer", ["answer"], registry=r
        )
        self.outcomes = Counter(
            "edge_ingest_batch_outcomes",
            "Batches the database decided, by outcome (applied, gap, replay, reused, overlap)",
            ["outcome"],
            registry=r,
        )
        self.chunks = Counter(
            "edge_ingest_chunks_merged", "Chunks of applied batches merged", registry=r
        )
        self.rows = Counter(
            "edge_ingest_rows_written", "Rows upserted, by table", ["table"], registry=r
        )
        self.messages = Counter(
            "edge_ingest_messages", "Camera messages the applied chunks stand for", registry=r
        )
        self.gap_seqs = Counter(
            "edge_ingest_gap_seqs", "Seqs skipped by gateways jumping ahead (C6)", registry=r
        )
        self.unavailable = Counter(
            "edge_ingest_unavailable", "503 answers, by cause", ["cause"], registry=r
        )
        self.commit_seconds = Histogram(
            "edge_ingest_commit_seconds",
            "From taking a connection to COMMIT returned, per applied batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        Gauge(
            "edge_ingest_pool_size", "Database connections configured (max)", registry=r
        ).set_function(lambda: store.size)
        Gauge("edge_ingest_pool_open", "Database connections open", registry=r).set_function(
            lambda: store.opened
        )
        Gauge("edge_ingest_pool_in_use", "Connections in a transaction", registry=r).set_function(
            lambda: store.in_use
        )
        Gauge(
            "edge_ingest_pool_waiting", "Requests waiting for a connection", registry=r
        ).set_function(lambda: store.waiting + store.queued)
        for a in ANSWERS:
            self.batches.labels(a)
        for c in CAUSES:
            self.unavailable.labels(c)
        for o in ("applied", "gap", "replay", "reused", "overlap"):
            self.outcomes.labels(o)
        for t in ("counts", "numeric", "categories"):
            self.rows.labels(t)
