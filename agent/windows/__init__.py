"""Per-second windows: the pure aggregator."""
