"""Tests of edge-ingest and of its test tooling (a private PostgreSQL: devtools/postgres.py)."""
