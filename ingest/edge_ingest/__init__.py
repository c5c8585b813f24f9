"""edge-ingest: the cloud half of edge-agent. It receives the agent's batches over HTTP and
merges their chunks exactly once into PostgreSQL through one small connection pool
(docs/ingest.md; guarantees C1–C6)."""
