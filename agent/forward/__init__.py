"""From the outbox to the cloud: batches, the response matrix, pacing, outage decisions."""
