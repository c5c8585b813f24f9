"""The forwarder against the real reference receiver, one test per row of the response matrix.

The forwarder runs in the test's event loop over a real SQLite outbox; the receiver is a real
process told how to fail through POST /_fault.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.config.settings import ForwardSettings
from agent.core.model import Chunk, encode_chunk
from agent.core.stats import Stats
from agent.durable.outbox import CheckpointWrite, Outbox
from agent.durable.store import list_dead_letters, retry_dead_letters
from agent.forward.forwarder import SUSPECT_CLOUD_AFTER, Forwarder, classify
from agent.sim.cloud import load_merged
from devtools.procs import Receiver


@dataclass
class Rig:
    outbox: Outbox
    forwarder: Forwarder
    stats: Stats
    receiver: Receiver
    path: Path
    first_seq: int  # the seq of the first chunk written (a new file starts high, not at 1)

    async def fill(self, n: int, cameras: Callable[[int], str] = lambda i: f"cam-{i % 10}") -> None:
        chunks = []
        for i in range(n):
            c = Chunk(cameras(i), "det", 1764126000 + i, 1)
            c.add_times(1764126000.0 + i, 1764126000.5 + i)
            chunks.append(encode_chunk(c))
        await self.outbox.checkpoint(CheckpointWrite(chunks=chunks), now=1.0)
        self.forwarder.wake.set()

    async def until(self, cond: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
        async with asyncio.timeout(timeout_s):
            while not cond():  # noqa: ASYNC110 - polls another process's state, bounded
                await asyncio.sleep(0.02)


@pytest.fixture
async def rig(
    tmp_path: Path, receiver: Receiver, request: pytest.FixtureRequest
) -> AsyncIterator[Rig]:
    options = {
        "url": receiver.url, "linger_ms": 0, "backoff_min_s": 0.05, "backoff_max_s": 0.3,
        "timeout_s": 1.0, "max_batch_chunks": 1000, **getattr(request, "param", {}),
    }  # fmt: skip
    settings = ForwardSettings(**options)
    path = tmp_path / "outbox.sqlite3"
    outbox, rec = await Outbox.open(path, synchronous="normal")
    stats = Stats()
    async with httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False) as client:
        fwd = Forwarder(
            settings=settings, gateway_id="gw-test", outbox=outbox, client=client, stats=stats
        )
        task = asyncio.create_task(fwd.run())
        try:
            yield Rig(outbox, fwd, stats, receiver, path, rec.next_seq)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await outbox.close()


def stored(r: Rig) -> int:
    return int(r.receiver.stats()["chunks"])


async def test_2xx_delivers_and_deletes(rig: Rig) -> None:
    await rig.fill(2500)
    # The outbox's count drops in its worker thread a moment before the forwarder counts the
    # batch: wait for both.
    await rig.until(
        lambda: rig.outbox.chunk_count == 0 and rig.stats.chunks_sent == 2500, "drained"
    )
    assert stored(rig) == 2500
    assert rig.stats.batches_sent == 3  # 1000 + 1000 + 500, contiguous, in order
    gw = rig.receiver.stats()["gateways"]["gw-test"]
    assert gw["gaps"] == 0 and gw["out_of_order"] == 0
    assert rig.outbox.batch is None
    con = sqlite3.connect(rig.receiver.db)
    seqs = [s for (s,) in con.execute("SELECT seq FROM chunks ORDER BY seq")]
    con.close()
    assert seqs == list(range(rig.first_seq, rig.first_seq + 2500))


async def test_409_counts_as_acknowledged(rig: Rig) -> None:
    rig.receiver.fault(status=409)
    await rig.fill(10)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained")
    assert rig.stats.batches_failed == 0


@pytest.mark.parametrize("status", [429, 503])
async def test_throttle_honours_retry_after_and_cuts_the_pace(rig: Rig, status: int) -> None:
    rig.receiver.fault(status=status, retry_after_s=0.2)
    await rig.fill(10)
    await rig.until(lambda: rig.stats.throttled >= 2, "throttled twice")
    assert rig.forwarder.pacer.rate <= rig.forwarder.pacer.max_rate / 4
    assert rig.outbox.chunk_count == 10  # kept
    rig.receiver.fault(status=None)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained")
    assert stored(rig) == 10


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_server_errors_retry_with_backoff_and_keep_everything(rig: Rig, status: int) -> None:
    rig.receiver.fault(status=status)
    await rig.fill(10)
    await rig.until(lambda: rig.stats.batches_failed >= 1, "a failure")
    first = rig.outbox.batch
    assert first is not None and first.chunks == 10
    await rig.fill(5)  # more chunks arrive while the batch is retried
    await rig.until(lambda: rig.stats.batches_failed >= 3, "three failures")
    assert rig.outbox.chunk_count == 15
    # G7: every retry sends the same cut batch: same seqs, bytes and Idempotency-Key.
    assert rig.outbox.batch == first
    body, headers = rig.forwarder.request(first)
    assert rig.forwarder.request(first) == (body, headers)
    assert headers["Idempotency-Key"] == f"gw-test:{rig.first_seq}-{rig.first_seq + 9}"
    assert rig.forwarder.unhealthy_reason is None
    rig.receiver.fault(status=None)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained")
    assert stored(rig) == 15
    assert rig.receiver.stats()["gateways"]["gw-test"]["gaps"] == 0


async def test_timeout_is_retried(rig: Rig) -> None:
    rig.receiver.fault(delay_ms=1500)  # beyond timeout_s = 1
    await rig.fill(5)
    await rig.until(lambda: rig.stats.batches_failed >= 1, "a timeout")
    assert "Timeout" in (rig.stats.last_forward_error or "")
    rig.receiver.fault(delay_ms=0)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained")
    assert rig.receiver.stats()["chunks"] == 5  # the timed-out attempt may have landed: deduped


async def test_a_cloud_always_slower_than_the_timeout_still_gets_the_batch(rig: Rig) -> None:
    """The cut batch never changes, so only waiting longer can get it through: each timed-out
    attempt doubles the wait (up to 8 x timeout_s); three in a row make /readyz say so."""
    rig.receiver.fault(delay_ms=2500)  # always beyond timeout_s = 1, within 4 s
    await rig.fill(5)
    # (The outbox's count drops in its worker thread a moment before the forwarder counts the
    # batch as sent: wait for both.)
    await rig.until(
        lambda: rig.outbox.chunk_count == 0 and rig.stats.batches_sent == 1, "drained", 30
    )
    assert rig.stats.batches_failed >= 2 and rig.stats.batches_sent == 1
    assert rig.receiver.stats()["chunks"] == 5
    assert rig.forwarder.unhealthy_reason is None  # cleared by the answer


async def test_three_timeouts_in_a_row_are_reported(rig: Rig) -> None:
    rig.receiver.fault(delay_ms=20000)
    await rig.fill(2)
    await rig.until(lambda: rig.stats.batches_failed >= 3, "three timeouts", timeout_s=30)
    assert "cloud did not answer within" in (rig.forwarder.unhealthy_reason or "")
    rig.receiver.fault(delay_ms=0)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained", timeout_s=30)
    assert rig.forwarder.unhealthy_reason is None


async def test_connection_refused_is_retried(rig: Rig) -> None:
    rig.receiver.kill()
    await rig.fill(5)
    await rig.until(lambda: rig.stats.batches_failed >= 2, "refusals")
    assert "ConnectError" in (rig.stats.last_forward_error or "")
    rig.receiver.start()
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained")
    assert stored(rig) == 5


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_refused_keeps_data_and_reports_unhealthy(rig: Rig, status: int) -> None:
    rig.receiver.fault(status=status)
    await rig.fill(5)
    await rig.until(lambda: rig.forwarder.unhealthy_reason is not None, "unhealthy")
    assert str(status) in (rig.forwarder.unhealthy_reason or "")
    assert rig.outbox.chunk_count == 5
    rig.receiver.fault(status=None)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained")
    assert rig.forwarder.unhealthy_reason is None


async def test_redirect_is_not_followed(rig: Rig) -> None:
    rig.receiver.fault(status=307)
    await rig.fill(5)
    await rig.until(lambda: rig.forwarder.unhealthy_reason is not None, "unhealthy")
    assert "redirect" in (rig.forwarder.unhealthy_reason or "")
    assert rig.outbox.chunk_count == 5


async def test_413_splits_the_batch(rig: Rig) -> None:
    rig.receiver.fault(max_body_bytes=900)  # a few compressed chunks fit, 100 do not
    await rig.fill(100)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained")
    assert stored(rig) == 100
    assert rig.stats.batches_sent > 1
    assert rig.stats.dead_letters == 0


async def test_poison_chunk_goes_to_dead_letters_and_the_rest_arrives(rig: Rig) -> None:
    """One chunk in a batch of 1,000 is refused (422): bisect to it, set it aside, go on."""
    rig.receiver.fault(poison_camera="cam-poison")
    await rig.fill(1000, cameras=lambda i: "cam-poison" if i == 617 else f"cam-{i % 10}")
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained", timeout_s=60)
    assert stored(rig) == 999
    dead = list_dead_letters(rig.path)
    assert [d["seq"] for d in dead] == [rig.first_seq + 617]
    assert dead[0]["status"] == 422 and "cam-poison" in dead[0]["response"]
    assert rig.stats.dead_letters == 1
    # The operator fixes the cloud and retries: the chunk goes out under a new seq.
    rig.receiver.fault(poison_camera=None)
    assert retry_dead_letters(rig.path, None) == 1
    await rig.until(lambda: stored(rig) == 1000, "the retried dead letter", timeout_s=30)
    assert list_dead_letters(rig.path) == []
    merged = load_merged(rig.receiver.db)
    assert sum(c.count for c in merged.values()) == 1000
    con = sqlite3.connect(rig.receiver.db)
    (poison_seq,) = con.execute("SELECT seq FROM chunks WHERE camera = 'cam-poison'").fetchone()
    con.close()
    assert poison_seq > rig.first_seq + 999  # a new seq, above every seq used before


async def test_bad_request_on_a_single_chunk_is_a_dead_letter(rig: Rig) -> None:
    rig.receiver.fault(status=400)
    await rig.fill(1)
    await rig.until(lambda: rig.stats.dead_letters == 1, "a dead letter")
    assert rig.outbox.chunk_count == 0
    assert json.loads(list_dead_letters(rig.path)[0]["response"])["error"] == "forced by /_fault"


async def test_a_cloud_that_refuses_everything_does_not_empty_the_outbox(rig: Rig) -> None:
    """A proxy answering 400 to every batch: after SUSPECT_CLOUD_AFTER chunks dead-lettered in
    a row the cloud is suspected, not the chunks: the rest is kept, /readyz says why, and it
    all goes out once the cloud takes a batch again."""
    rig.receiver.fault(status=400)
    await rig.fill(200)
    await rig.until(lambda: rig.forwarder.unhealthy_reason is not None, "suspicion", timeout_s=30)
    assert "refused 10 chunks in a row" in (rig.forwarder.unhealthy_reason or "")
    assert rig.stats.dead_letters == SUSPECT_CLOUD_AFTER
    assert rig.outbox.chunk_count == 200 - SUSPECT_CLOUD_AFTER
    rig.receiver.fault(status=None)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained", timeout_s=30)
    assert stored(rig) == 200 - SUSPECT_CLOUD_AFTER
    assert rig.forwarder.unhealthy_reason is None


def test_matrix_table() -> None:
    assert classify(200, batch_size=5).kind == "ok"
    assert classify(204, batch_size=5).kind == "ok"
    assert classify(409, batch_size=5).kind == "ok"
    assert classify(429, batch_size=5, retry_after=3).retry_after_s == 3
    assert classify(503, batch_size=5).throttled
    assert classify(500, batch_size=5).kind == "retry"
    assert classify(None, batch_size=5).kind == "retry"
    assert classify(413, batch_size=5).kind == "split"
    assert classify(413, batch_size=1).kind == "poison"
    assert classify(422, batch_size=2).kind == "split"
    assert classify(400, batch_size=1).kind == "poison"
    assert classify(401, batch_size=5).unhealthy
    assert classify(301, batch_size=5).kind == "retry"
    assert classify(404, batch_size=5).unhealthy


def max_in_any_second(times: list[float]) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize(
    "rig", [{"max_chunks_per_s": 2000, "min_chunks_per_s": 100, "max_batch_chunks": 200}],
    indirect=True,
)  # fmt: skip
async def test_replay_keeps_under_the_pace_and_backs_off_on_429(rig: Rig) -> None:
    await rig.fill(3000)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained", timeout_s=30)
    con = sqlite3.connect(rig.receiver.db)
    times = sorted(t for (t,) in con.execute("SELECT received_at FROM chunks"))
    con.close()
    assert len(times) == 3000
    # At most the pace plus one batch in any one-second span (timing only slows this down).
    assert max_in_any_second(times) <= 2000 + 200
    assert rig.forwarder.pacer.rate == 2000

    rig.receiver.fault(throttle_every=2, retry_after_s=0.05)
    await rig.fill(1000)
    await rig.until(lambda: rig.stats.throttled >= 3, "throttling")
    assert rig.forwarder.pacer.rate < 2000  # multiplicative decrease
    rig.receiver.fault(throttle_every=0)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained", timeout_s=30)
    await rig.fill(2000)
    await rig.until(lambda: rig.outbox.chunk_count == 0, "drained", timeout_s=30)
    assert rig.forwarder.pacer.rate == 2000  # additive increase back to the maximum
