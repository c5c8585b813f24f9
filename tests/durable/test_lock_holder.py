"""`holder()` (for `edge-agent forward --now`) names the process holding the outbox's lock
without taking a lock itself: an agent starting at that moment is never refused."""

from __future__ import annotations

import os
from pathlib import Path

from agent.durable.lock import OutboxLock, holder


def test_the_holder_is_named_and_nobody_when_free(tmp_path: Path) -> None:
    outbox = tmp_path / "buffer.sqlite3"
    assert holder(outbox) is None  # no lock file
    lock = OutboxLock(outbox)
    lock.acquire()
    try:
        assert holder(outbox) == os.getpid()
        # Asked again and again, it never gets in the way of the lock.
        for _ in range(100):
            assert holder(outbox) == os.getpid()
    finally:
        lock.release()
    assert holder(outbox) is None  # the file stays, with a stale pid in it
    again = OutboxLock(outbox)
    for _ in range(100):
        holder(outbox)
    again.acquire()
    again.release()
