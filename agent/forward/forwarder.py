"""Ordered batches from the outbox to the cloud: one in flight, delete only after a 2xx/409.

G3: a batch is a contiguous seq range read in seq order, and batch n+1 is read only after batch n
was acknowledged and deleted. A cancelled send is an unsent send: nothing is deleted unless the
response said so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import logging
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from agent import __version__
from agent.config.settings import ForwardSettings
from agent.core.backoff import Backoff
from agent.core.clock import SYSTEM_CLOCK, Clock
from agent.core.errors import OutboxError
from agent.core.stats import Stats
from agent.core.text import one_line
from agent.durable.outbox import Batch, Outbox
from agent.forward.outage import recovery_line
from agent.forward.pacing import Pacer, retry_after_s

log = logging.getLogger(__name__)


MAX_RESPONSE_BYTES = 4096
GZIP_LEVEL = 5
# After this many chunks dead-lettered in a row with no batch taken in between, the cloud is
# suspected, not the chunks: nothing more is dead-lettered until a batch goes through.
SUSPECT_CLOUD_AFTER = 10

Kind = Literal["ok", "retry", "split", "poison"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a response means for the batch: delete it, retry it, split it, or set a chunk aside."""

    kind: Kind
    detail: str
    throttled: bool = False
    retry_after_s: float | None = None
    unhealthy: str | None = None


def classify(status: int | None, *, batch_size: int, retry_after: float | None = None) -> Outcome:
    """The response matrix (docs/design.md, "When things fail"; status None: no response at all)."""
    if status is None:
        return Outcome("retry", "no response")
    if 200 <= status < 300 or status == 409:
        return Outcome("ok", f"HTTP {status}")
    if status in (429, 503):
        return Outcome("retry", f"HTTP {status}", throttled=True, retry_after_s=retry_after)
    if status in (400, 413, 422):
        # 413: too large; 400/422: a chunk the cloud will never take. Halve until one chunk is
        # left; a single chunk still refused goes to the dead letters.
        return Outcome("split" if batch_size > 1 else "poison", f"HTTP {status}")
    if status in (401, 403):
        return Outcome("retry", f"HTTP {status}", unhealthy=f"cloud refused credentials ({status})")
    if 300 <= status < 400:
        return Outcome(
            "retry",
            f"HTTP {status}",
            unhealthy=f"cloud answered a redirect ({status}); not followed",
        )
    if 400 <= status < 500:
        return Outcome(
            "retry", f"HTTP {status}", unhealthy=f"cloud answered {status}; check forward.url"
        )
    return Outcome("retry", f"HTTP {status}")


# Attempts kept for `edge-agent tap --sent` (each about 200 bytes).
SENT_KEPT = 256


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
        clock: Clock = SYSTEM_CLOCK,
        fault: Callable[[str], None] = lambda point: None,
        probe: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._fault = fault
        # A cheap "is the cloud back?" (a TCP connect), tried every forward.probe_interval_s
        # during a backoff after a failure without an answer. None: the backoff is waited out.
        self._probe = probe
        self._no_answer = False
        self._probed_in_streak = False
        # Set by SIGUSR1 (`edge-agent forward --now`): end the current backoff at once.
        self.retry_now = asyncio.Event()
        # The last attempts, for `edge-agent tap --sent` (GET /status/sent): numbered from 1.
        self.sent: deque[dict[str, Any]] = deque(maxlen=SENT_KEPT)
        self.sent_count = 0
        self._clock = clock
        self._s = settings
        self._gateway_id = gateway_id
        self._outbox = outbox
        self._client = client
        self._stats = stats
        self._token = token
        self._backoff = Backoff(min_s=settings.backoff_min_s, max_s=settings.backoff_max_s, rng=rng)
        self.pacer = Pacer(
            max_chunks_per_s=settings.max_chunks_per_s,
            min_chunks_per_s=settings.min_chunks_per_s,
            max_bytes_per_s=settings.max_bytes_per_s,
            fast_response_s=settings.fast_response_s,
        )
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.unhealthy_reason: str | None = None
        self.backoff_until: float | None = None
        # Batch size: halved on 413/400/422 to bisect down to a refused chunk, doubled back on
        # each success, reset once the refused chunk is set aside.
        self._limit = settings.max_batch_chunks
        self._timeouts_in_row = 0
        # Chunks dead-lettered since the cloud last took a batch.
        self._dead_in_row = 0

    async def run(self) -> None:
        s = self._s
        while True:
            if self._outbox.chunk_count == 0 and self._outbox.batch is None:
                self.idle.set()
                self.wake.clear()
                # Re-read the outbox now and then: `deadletter retry` may have added chunks.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await self.wake.wait()
                try:
                    await self._outbox.refresh_counts()
                except OutboxError as e:  # a disk gone for reads too: wait, never end the task
                    await asyncio.sleep(self._store_failed(e))
                    continue
                if self._outbox.chunk_count == 0:
                    continue
                self.idle.clear()
                if s.linger_ms and self._outbox.chunk_count < s.max_batch_chunks:
                    await asyncio.sleep(s.linger_ms / 1000)
            pace = self.pacer.delay(self._clock.mono())
            if pace:
                await asyncio.sleep(pace)
            # The batch cut earlier (before a failure or a restart) goes first, unchanged (G7).
            try:
                batch = await self._outbox.cut(
                    gateway_id=self._gateway_id,
                    max_chunks=self._limit,
                    max_bytes=s.max_batch_bytes,
                    now=self._clock.wall(),
                )
            except OutboxError as e:
                await asyncio.sleep(self._store_failed(e))
                continue
            if batch is None:
                try:
                    await self._outbox.refresh_counts()
                except OutboxError as e:
                    await asyncio.sleep(self._store_failed(e))
                continue
            try:
                delay = await self._send(batch)
            except OutboxError as e:
                delay = self._store_failed(e)
            if delay:
                self.backoff_until = self._clock.wall() + delay
                await self._wait_backoff(delay)
                self.backoff_until = None

    def reconfigure(
        self,
        settings: ForwardSettings,
        *,
        client: httpx.AsyncClient,
        token: Callable[[], str | None],
        probe: Callable[[], Awaitable[bool]] | None,
    ) -> None:
        """Take new forward settings (a reload): the next attempt uses them. The cut batch is
        untouched (G7): the same seqs, bytes and key go to the new url."""
        self._s = settings
        self._client = client
        self._token = token
        self._probe = probe
        self._backoff.min_s, self._backoff.max_s = settings.backoff_min_s, settings.backoff_max_s
        pacer = self.pacer
        pacer.max_rate = settings.max_chunks_per_s
        pacer.min_rate = min(settings.min_chunks_per_s, settings.max_chunks_per_s)
        pacer.rate = min(max(pacer.rate, pacer.min_rate), pacer.max_rate)
        pacer.max_bytes_per_s = settings.max_bytes_per_s
        pacer.fast_response_s = settings.fast_response_s
        self._limit = min(self._limit, settings.max_batch_chunks)
        self.retry_now.set()  # a backoff for the old url or token ends now

    async def _wait_backoff(self, delay: float) -> None:
        """Wait `delay`, or less: until `retry_now` is set, or, after a failure without an
        answer, until a probe finds the cloud reachable again."""
        # (retry_now is not cleared here: a request made during the attempt counts.)
        interval = self._s.probe_interval_s
        probing = self._probe is not None and self._no_answer and 0 < interval < delay
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay  # the loop's time, as asyncio.sleep(delay) had it
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, interval) if probing else left):
                    await self.retry_now.wait()
            if self.retry_now.is_set():
                log.info("retrying now (SIGUSR1), %.1f s before the backoff ended", left)
                self.retry_now.clear()
                return
            if not probing:
                return
            assert self._probe is not None
            if deadline - loop.time() > 0 and await self._probe():
                self._probed_in_streak = True
                log.info(
                    "the cloud accepts connections again: sending now, %.1f s before the "
                    "backoff ended",
                    deadline - loop.time(),
                )
                return

    async def drain(self, timeout_s: float) -> bool:
        """Wait (at most timeout_s) until the outbox is empty; True if it is."""
        self.wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._outbox.chunk_count or self._outbox.batch is not None:
                    self.idle.clear()
                    await self.idle.wait()
        return not (self._outbox.chunk_count or self._outbox.batch is not None)

    def request(self, batch: Batch) -> tuple[bytes, dict[str, str]]:
        """The body and headers of a batch: the same bytes and key on every attempt."""
        return build_request(self._s, self._gateway_id, batch, token=self._token())

    @property
    def pace(self) -> float:
        """The current send pace, chunks per second (AIMD)."""
        return self.pacer.rate

    @property
    def token_problem(self) -> str | None:
        """What is wrong with the cloud token (its source's `problem`), if anything."""
        problem: str | None = getattr(self._token, "problem", None)
        return problem

    async def _send(self, batch: Batch) -> float:
        """Post one batch and act on the answer; returns seconds to wait before the next."""
        first, last = batch.first_seq, batch.last_seq
        body, headers = self.request(batch)
        started = self._clock.mono()
        self.pacer.sent(batch.chunks, len(body), started)
        status: int | None = None
        text = ""
        retry_after = None
        exc: BaseException | None = None
        wait_s = self._attempt_timeout_s()
        timed_out = False
        try:
            # One deadline for the whole attempt (a cloud trickling a byte at a time cannot hold
            # the forwarder), on top of httpx's per-read timeout.
            async with (
                asyncio.timeout(wait_s + 1.0),
                self._client.stream(
                    "POST", self._s.url, content=body, headers=headers, timeout=wait_s
                ) as r,
            ):
                status = r.status_code
                text = await _read_capped(r)
                retry_after = retry_after_s(r.headers.get("Retry-After"), now=self._clock.wall())
        except httpx.TimeoutException as e:
            timed_out = True
            text = f"{type(e).__name__}: no answer within {wait_s:g} s"
        except TimeoutError:
            timed_out = True
            text = f"no complete answer within {wait_s + 1.0:g} s"
        except httpx.HTTPError as e:
            text = f"{type(e).__name__}: {e}"
            exc = e
        # Refused or unreachable: no connection at all, so a TCP connect tells when it is back.
        # Not after a connection that then failed (TLS, a reset): a connect proves nothing
        # there, and probing would pin the backoff to probe_interval_s. And once per streak:
        # a probe that succeeded and an attempt that failed again leave the backoff alone.
        refused = status is None and not timed_out and _refused(exc)
        self._no_answer = refused and not self._probed_in_streak
        self._note_timeout(timed_out, wait_s)
        latency_s = self._clock.mono() - started
        self._stats.observe_latency(latency_s)
        outcome = classify(status, batch_size=batch.chunks, retry_after=retry_after)
        self.sent_count += 1
        self.sent.append(
            {
                "n": self.sent_count,
                "at": self._clock.wall(),
                "first_seq": first,
                "last_seq": last,
                "chunks": batch.chunks,
                "bytes": len(body),
                "status": status,
                "answer": one_line(text)[:160] if status is None or status >= 300 else "",
                "outcome": outcome.kind,
                "latency_ms": round(latency_s * 1000, 1),
            }
        )
        if outcome.kind == "ok":
            self._fault("after_send")
            await self._outbox.acknowledged(batch)
            self._acknowledged(batch, len(body), latency_s)
            return 0.0
        if outcome.kind == "split":
            # Refused as a whole: the cloud stored none of it, so it may be cut again smaller.
            await self._outbox.release(batch)
            self._limit = max(1, batch.chunks // 2)
            log.warning(
                "batch %d-%d refused (%s: %s); retrying in halves of %d chunks",
                first, last, outcome.detail, one_line(text), self._limit,
            )  # fmt: skip
            return 0.0
        if outcome.kind == "poison" and self._dead_in_row >= SUSPECT_CLOUD_AFTER:
            # So many chunks refused one by one, nothing taken in between: the cloud (or a
            # proxy) refuses everything. Keep the data, say so, and try again later.
            return self._failed(
                first,
                last,
                Outcome(
                    "retry",
                    outcome.detail,
                    unhealthy=(
                        f"cloud refused {self._dead_in_row} chunks in a row one by one "
                        f"({outcome.detail}); not dead-lettering more until it takes one"
                    ),
                ),
                text,
            )
        if outcome.kind == "poison":
            self._dead_in_row += 1
            await self._outbox.dead_letter(batch, status=status, response=text[:MAX_RESPONSE_BYTES])
            self._stats.dead_letters += 1
            self._limit = self._s.max_batch_chunks
            log.error(
                "chunk %d refused by the cloud (%s: %s); moved to the dead letters "
                "(see `edge-agent deadletter list`)",
                first, outcome.detail, one_line(text),
            )  # fmt: skip
            return 0.0
        return self._failed(first, last, outcome, text)

    def _attempt_timeout_s(self) -> float:
        """forward.timeout_s, doubled after each attempt that timed out in a row (up to 8x):
        a cut batch never changes, so a cloud slower than the timeout would otherwise never
        take it. Back to timeout_s after any answer."""
        return float(self._s.timeout_s * (1 << min(self._timeouts_in_row, 3)))

    def _note_timeout(self, timed_out: bool, wait_s: float) -> None:
        if not timed_out:
            self._timeouts_in_row = 0
            if self.unhealthy_reason and self.unhealthy_reason.startswith("cloud did not answer"):
                self.unhealthy_reason = None
            return
        self._timeouts_in_row += 1
        if self._timeouts_in_row >= 3:
            self.unhealthy_reason = (
                f"cloud did not answer within {wait_s:g} s, {self._timeouts_in_row} times in a "
                f"row (forward.timeout_s = {self._s.timeout_s:g}; waiting longer each time)"
            )

    def _store_failed(self, e: OutboxError) -> float:
        """An outbox write failed (a full disk, an I/O error): nothing is lost — the batch and
        its rows stay as they were — so back off and try again; never end the task."""
        self._stats.outbox_errors += 1
        delay = self._backoff.next_delay()
        log.warning(
            "outbox write failed in the forwarder (%s); attempt %d, retrying in %.1f s",
            e, self._backoff.attempt, delay,
        )  # fmt: skip
        return delay

    def _acknowledged(self, batch: Batch, nbytes: int, latency_s: float) -> None:
        st = self._stats
        st.batches_sent += 1
        st.chunks_sent += batch.chunks
        st.bytes_sent += nbytes
        st.last_forward_ok = now = self._clock.wall()
        if st.forward_failing_since is not None:
            log.info(
                "%s",
                recovery_line(
                    now=now,
                    failing_since=st.forward_failing_since,
                    failed_attempts=st.forward_failures_in_row,
                    backlog=self._outbox.chunk_count,
                ),
            )
        st.forward_failing_since, st.forward_failures_in_row = None, 0
        st.last_forward_error = st.last_forward_error_at = None
        self.unhealthy_reason = None
        self._dead_in_row = 0
        self._probed_in_streak = False
        self._backoff.reset()
        self.pacer.answered(latency_s)
        if self._limit < self._s.max_batch_chunks:
            self._limit = min(self._s.max_batch_chunks, self._limit * 2)

    def _failed(self, first: int, last: int, outcome: Outcome, text: str) -> float:
        st = self._stats
        st.batches_failed += 1
        st.last_forward_error = f"{outcome.detail}: {one_line(text)}" if text else outcome.detail
        st.last_forward_error_at = now = self._clock.wall()
        if st.forward_failing_since is None:
            st.forward_failing_since = now
        st.forward_failures_in_row += 1
        if outcome.unhealthy:
            self.unhealthy_reason = outcome.unhealthy
        if outcome.throttled:
            st.throttled += 1
            self.pacer.throttled()
        delay = self._backoff.next_delay()
        if outcome.retry_after_s is not None:
            delay = min(outcome.retry_after_s, self._s.backoff_max_s)
        log.warning(
            "batch %d-%d not delivered (%s); attempt %d, retrying in %.1f s at %.0f chunks/s, "
            "%d chunks kept",
            first, last, st.last_forward_error, self._backoff.attempt, delay, self.pacer.rate,
            self._outbox.chunk_count,
        )  # fmt: skip
        return delay


def _refused(exc: BaseException | None) -> bool:
    """Whether an attempt failed before any connection existed (refused, unreachable, no
    route, name unresolved), as opposed to a connection that then failed."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ConnectionRefusedError | socket.gaierror) or (
            isinstance(exc, OSError)
            and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def tcp_probe(url: str, timeout_s: float = 2.0) -> Callable[[], Awaitable[bool]]:
    """A probe of `url`'s host and port: True when a TCP connection opens within timeout_s
    (then closed at once: no TLS, no request; a few packets per probe)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)

    async def probe() -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    return probe


def build_request(
    settings: ForwardSettings, gateway_id: str, batch: Batch, *, token: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """What is POSTed for a batch: its body (gzipped when forward.gzip; mtime 0, so the same
    batch gives the same bytes on every attempt) and the headers. Pure: the benchmarks post
    exactly this, rather than a copy of it."""
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": batch.key(gateway_id),
        "User-Agent": f"edge-agent/{__version__}",
    }
    body = batch.body
    if settings.gzip:
        body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
        headers["Content-Encoding"] = "gzip"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return body, headers


async def _read_capped(r: httpx.Response) -> str:
    """At most MAX_RESPONSE_BYTES of the response body: never read an unbounded answer."""
    data = b""
    async for part in r.aiter_raw():
        data += part
        if len(data) >= MAX_RESPONSE_BYTES:
            break
    return data[:MAX_RESPONSE_BYTES].decode("utf-8", "replace")
