"""Tests of the outbox and the checkpoint."""
