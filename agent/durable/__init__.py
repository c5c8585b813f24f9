"""The outbox: the checkpoint (commit, then ack), SQLite transactions, compaction, the lock."""
