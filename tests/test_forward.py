from __future__ import annotations

import email.utils
import gzip
import json
import random

from agent.forward import encode_batch
from agent.pacing import Backoff, retry_after_s


def test_retry_after_seconds_and_http_date() -> None:
    assert retry_after_s("7", now=0) == 7
    now = 1_800_000_000.0
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0
    assert retry_after_s("soon", now=now) is None
    assert retry_after_s(None, now=now) is None


def test_backoff_is_capped_with_jitter() -> None:
    b = Backoff(min_s=0.5, max_s=10, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(40)]
    assert all(0.25 <= d <= 10 for d in delays)
    assert max(delays[:3]) <= 2.0
    assert len({round(d, 6) for d in delays}) > 30
    b.reset()
    assert b.next_delay() <= 0.5


def test_batch_body_splices_stored_chunks() -> None:
    body = encode_batch(
        "gw-1",
        [(41, b'{"camera":"c","count":2}'), (42, b'{"camera":"d","count":1}')],
        sent_at=1764126000.5,
    )
    doc = json.loads(gzip.decompress(gzip.compress(body)))
    assert doc["schema"] == "edge-agent/v1" and doc["gateway"] == "gw-1"
    assert (doc["first_seq"], doc["last_seq"]) == (41, 42)
    assert doc["sent_at"] == "2025-11-26T03:00:00.500Z"
    assert [c["seq"] for c in doc["chunks"]] == [41, 42]
    assert doc["chunks"][0] == {"seq": 41, "camera": "c", "count": 2}
