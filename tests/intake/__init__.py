"""Tests of the intake and the ack ledger."""
