"""Wiring: the pipeline built from its parts, signals, the shutdown order, crash-test hooks."""
