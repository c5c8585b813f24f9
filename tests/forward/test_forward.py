from __future__ import annotations

import email.utils
import gzip
import json
import random

from agent.core.backoff import Backoff
from agent.core.model import encode_batch
from agent.core.text import one_line
from agent.forward.pacing import retry_after_s


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
    stored = [b'{"camera":"c","count":2}', b'{"camera":"d","count":1}']
    body = encode_batch("gw-1", [(41, 41, stored[0]), (42, 42, stored[1])], sent_at=1764126000.5)
    doc = json.loads(gzip.decompress(gzip.compress(body)))
    assert doc["schema"] == "edge-agent/v1" and doc["gateway"] == "gw-1"
    assert (doc["first_seq"], doc["last_seq"]) == (41, 42)
    assert doc["sent_at"] == "2025-11-26T03:00:00.500Z"
    assert [c["seq"] for c in doc["chunks"]] == [41, 42]
    assert doc["chunks"][0] == {"seq": 41, "camera": "c", "count": 2}
    # A chunk standing for itself only carries no seq_end.
    assert all("seq_end" not in c for c in doc["chunks"])
    # Spliced, not re-encoded: the stored bytes appear verbatim after the seq prefix.
    assert b'{"seq":41,"camera":"c","count":2}' in body


def test_batch_body_declares_the_seqs_a_compacted_chunk_stands_for() -> None:
    """A compacted row [seq, seq_end] declares its range; last_seq is the end of the last row's
    range, so the batch covers a contiguous seq range without a gap at the cloud."""
    body = encode_batch(
        "gw-1",
        [(10, 14, b'{"camera":"c","count":7}'), (15, 15, b'{"camera":"d","count":1}')],
        sent_at=0.0,
    )
    doc = json.loads(body)
    assert (doc["first_seq"], doc["last_seq"]) == (10, 15)
    assert doc["chunks"][0] == {"seq": 10, "seq_end": 14, "camera": "c", "count": 7}
    assert doc["chunks"][1] == {"seq": 15, "camera": "d", "count": 1}
    assert doc["sent_at"] == "1970-01-01T00:00:00.000Z"
    tail = encode_batch("gw-1", [(20, 29, b'{"count":3}')], sent_at=0.0)
    assert (json.loads(tail)["first_seq"], json.loads(tail)["last_seq"]) == (20, 29)


def test_the_clouds_words_cannot_forge_log_lines() -> None:

    forged = 'bad\n2026-11-26 03:00:00 INFO agent: all good\r\x1b[2J{"x": 1}'
    shown = one_line(forged)
    assert "\n" not in shown and "\r" not in shown and "\x1b" not in shown
    assert shown.startswith("bad\\n2026-11-26") and '{"x": 1}' in shown
    assert len(one_line("y" * 5000)) == 200
