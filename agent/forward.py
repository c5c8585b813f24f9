"""Ordered batches from the outbox to the cloud: one in flight, delete only after a 2xx/409.

G3: a batch is a contiguous seq range read in seq order, and batch n+1 is read only after batch n
was acknowledged and deleted. A cancelled send is an unsent send: nothing is deleted unless the
response said so.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import random
import time
from collections.abc import Callable

import httpx

from agent import __version__
from agent.config import ForwardSettings
from agent.faults import NO_FAULTS, Faults
from agent.model import SCHEMA, with_seq
from agent.outbox import Outbox
from agent.stats import Stats

log = logging.getLogger(__name__)


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, *, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.max_s, self.min_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self._rng.uniform(self.min_s / 2, cap)

    def reset(self) -> None:
        self.attempt = 0


def retry_after_s(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def encode_batch(gateway_id: str, rows: list[tuple[int, bytes]], *, sent_at: float) -> bytes:
    """The JSON body of a batch, splicing the stored chunk bodies without re-encoding them."""
    stamp = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sent_at))
        + f".{int(sent_at % 1 * 1000):03d}Z"
    )
    head = (
        f'{{"schema":"{SCHEMA}","gateway":"{gateway_id}","first_seq":{rows[0][0]},'
        f'"last_seq":{rows[-1][0]},"sent_at":"{stamp}","chunks":['
    ).encode()
    return head + b",".join(with_seq(s, b) for s, b in rows) + b"]}"


class Forwarder:
    """Reads batches from the outbox and posts them until told to stop (by cancellation)."""

    def __init__(
        self,
        *,
        settings: ForwardSettings,
        gateway_id: str,
        outbox: Outbox,
        client: httpx.AsyncClient,
        stats: Stats,
        token: Callable[[], str | None] = lambda: None,
        rng: random.Random | None = None,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self._faults = faults
        self._s = settings
        self._gateway_id = gateway_id
        self._outbox = outbox
        self._client = client
        self._stats = stats
        self._token = token
        self._backoff = Backoff(min_s=settings.backoff_min_s, max_s=settings.backoff_max_s, rng=rng)
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.unhealthy_reason: str | None = None
        self._limit = settings.max_batch_chunks

    async def run(self) -> None:
        s = self._s
        while True:
            if self._outbox.chunk_count == 0:
                self.idle.set()
                self.wake.clear()
                await self.wake.wait()
                self.idle.clear()
                if s.linger_ms and self._outbox.chunk_count < s.max_batch_chunks:
                    await asyncio.sleep(s.linger_ms / 1000)
            rows = await self._outbox.read_batch(
                after_seq=0, max_chunks=self._limit, max_bytes=s.max_batch_bytes
            )
            if not rows:
                continue
            delay = await self._send(rows)
            if delay is None:
                self._faults.hit("after_send")
                await self._outbox.delete_through(rows[-1][0])
                self._backoff.reset()
                if self._limit < s.max_batch_chunks:
                    self._limit = min(s.max_batch_chunks, self._limit * 2)
            else:
                await asyncio.sleep(delay)

    async def _send(self, rows: list[tuple[int, bytes]]) -> float | None:
        """Post one batch. None when the cloud acknowledged it, else seconds to wait."""
        first, last = rows[0][0], rows[-1][0]
        now = time.time()
        body = encode_batch(self._gateway_id, rows, sent_at=now)
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": f"{self._gateway_id}:{first}-{last}",
            "User-Agent": f"edge-agent/{__version__}",
        }
        if self._s.gzip:
            body = gzip.compress(body, compresslevel=5, mtime=0)
            headers["Content-Encoding"] = "gzip"
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        started = time.monotonic()
        try:
            resp = await self._client.post(self._s.url, content=body, headers=headers)
        except httpx.HTTPError as e:
            return self._failed(first, last, f"{type(e).__name__}: {e}", None)
        status = resp.status_code
        if 200 <= status < 300 or status == 409:
            st = self._stats
            st.batches_sent += 1
            st.chunks_sent += len(rows)
            st.bytes_sent += len(body)
            st.last_forward_ok = time.time()
            self.unhealthy_reason = None
            log.debug(
                "batch %d-%d acknowledged (%d) in %.0f ms",
                first,
                last,
                status,
                (time.monotonic() - started) * 1000,
            )
            return None
        hint = None
        if status in (429, 503):
            hint = retry_after_s(resp.headers.get("Retry-After"), now=time.time())
        elif status == 413 and len(rows) > 1:
            self._limit = max(1, len(rows) // 2)
            log.warning(
                "batch %d-%d too large (413); retrying with %d chunks", first, last, self._limit
            )
            return 0.0
        elif status in (401, 403):
            self.unhealthy_reason = f"cloud refused credentials ({status})"
        return self._failed(first, last, f"HTTP {status}", hint)

    def _failed(self, first: int, last: int, what: str, hint: float | None) -> float:
        self._stats.batches_failed += 1
        self._stats.last_forward_error = what
        delay = self._backoff.next_delay()
        if hint is not None:
            delay = min(max(hint, 0.0), self._s.backoff_max_s)
        log.warning(
            "batch %d-%d not delivered (%s); attempt %d, retrying in %.1f s, %d chunks kept",
            first,
            last,
            what,
            self._backoff.attempt,
            delay,
            self._outbox.chunk_count,
        )
        return delay
