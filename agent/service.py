"""Wiring: outbox, aggregator, MQTT session, checkpoint loop, forwarder; signals and shutdown order.

Shutdown (first SIGTERM/SIGINT): stop counting new messages, close every open window, last
checkpoint and acks, drain the forwarder for at most forward.shutdown_drain_s, disconnect. A
second signal exits at once (the outbox and the broker session keep everything).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from dataclasses import dataclass

import httpx
import msgspec

from agent.acks import AckLedger
from agent.aggregate import Aggregator
from agent.checkpoint import Checkpointer
from agent.config import Settings, secret_path
from agent.credentials import TokenSource, client_tls_context
from agent.faults import NO_FAULTS, Faults
from agent.forward import Forwarder
from agent.health import HealthServer, Response, json_response
from agent.ingest import Intake, MqttSession, TopicRouter
from agent.metrics import render as render_metrics
from agent.model import Chunk
from agent.notify import Notifier
from agent.outbox import Outbox
from agent.stats import Stats
from agent.status import alive_problems, ready_problems, status_document, status_line
from agent.timekeeping import ClockPolicy, Clocks

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Pipeline:
    """The running parts, exposed for the health endpoint and tests."""

    settings: Settings
    outbox: Outbox
    aggregator: Aggregator
    ledger: AckLedger
    intake: Intake
    clocks: Clocks
    session: MqttSession
    forwarder: Forwarder
    stats: Stats


async def run_service(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    faults: Faults = NO_FAULTS,
    notifier: Notifier | None = None,
) -> Pipeline:
    """Run until `stop` is set (or SIGTERM/SIGINT), then shut down in order."""
    stop = stop or asyncio.Event()
    notifier = notifier or Notifier()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting now; the outbox and broker session keep the data")
            raise SystemExit(1)
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

    stats = Stats()
    outbox, recovery = await Outbox.open(
        settings.buffer.path, synchronous=settings.buffer.synchronous, faults=faults
    )
    await outbox.set_quota(settings.buffer.max_bytes)
    if recovery.moved_aside is not None:
        stats.rejects["outbox_corrupt_moved_aside"] += 1
    agg_s = settings.aggregate
    aggregator = Aggregator(
        window_s=agg_s.window_s,
        allowed_lateness_s=agg_s.allowed_lateness_s,
        idle_close_s=agg_s.idle_close_s,
        late_policy=agg_s.late_policy,
        max_cameras=agg_s.max_cameras,
        max_streams_per_camera=agg_s.max_streams_per_camera,
        max_open_windows=agg_s.max_open_windows,
    )
    now = time.time()
    restored = aggregator.restore(
        (Chunk.from_wire(msgspec.json.decode(b)) for b in recovery.open_windows), now=now
    )
    aggregator.import_marks(recovery.marks, now=now)
    if recovery.marks:
        await outbox.clear_marks()
    ledger = AckLedger(recovery.journal)
    log.info(
        "outbox %s: %d chunks waiting, next seq %d; %d open windows restored; "
        "%d ack-journal entries; window marks for %d cameras",
        settings.buffer.path,
        recovery.chunks,
        recovery.next_seq,
        restored,
        len(recovery.journal),
        len(recovery.marks),
    )
    router = TopicRouter(settings.streams)
    clocks = Clocks(
        ClockPolicy(
            skew_policy=agg_s.skew_policy,
            max_skew_s=agg_s.max_skew_s,
            max_future_s=agg_s.max_future_s,
            max_age_s=agg_s.max_age_s,
            bad_time_policy=agg_s.bad_time_policy,
            jump_s=agg_s.clock_jump_s,
        )
    )
    intake = Intake(
        router=router,
        aggregator=aggregator,
        clocks=clocks,
        ledger=ledger,
        stats=stats,
        max_payload_bytes=settings.mqtt.max_payload_bytes,
        max_fields=settings.mqtt.max_fields,
        max_depth=settings.mqtt.max_depth,
    )
    session = MqttSession(
        settings=settings.mqtt, router=router, intake=intake, ledger=ledger, stats=stats
    )
    fs = settings.forward
    token = TokenSource(fs.token, secret_path(fs.token_file, "cloud-token"))
    verify: ssl.SSLContext | bool = True
    if fs.url.startswith("https://"):
        verify = client_tls_context(
            ca_file=fs.ca_file, cert_file=fs.cert_file, key_file=fs.key_file
        )
    async with httpx.AsyncClient(
        timeout=fs.timeout_s,
        follow_redirects=False,
        verify=verify,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    ) as http:
        forwarder = Forwarder(
            settings=fs,
            gateway_id=settings.gateway_id,
            outbox=outbox,
            client=http,
            stats=stats,
            token=token,
            faults=faults,
        )
        checkpointer = Checkpointer(
            settings=settings,
            outbox=outbox,
            aggregator=aggregator,
            ledger=ledger,
            session=session,
            forwarder=forwarder,
            stats=stats,
            faults=faults,
        )
        pipeline = Pipeline(
            settings, outbox, aggregator, ledger, intake, clocks, session, forwarder, stats
        )
        tasks: list[asyncio.Task[None]] = []

        def healthz() -> Response:
            done = [t.get_name() for t in tasks if t.done()]
            problems = alive_problems(pipeline, done, time.monotonic())
            return json_response(
                503 if problems else 200, {"ok": not problems, "problems": problems}
            )

        def readyz() -> Response:
            problems = ready_problems(pipeline)
            return json_response(
                503 if problems else 200, {"ok": not problems, "problems": problems}
            )

        health = HealthServer(
            listen=settings.health.listen,
            routes={
                "/healthz": healthz,
                "/readyz": readyz,
                "/status": lambda: json_response(200, status_document(pipeline)),
                "/metrics": lambda: (200, METRICS_CONTENT_TYPE, render_metrics(pipeline)),
            },
        )
        await health.start()
        try:
            async with asyncio.TaskGroup() as tg:
                mqtt_task = tg.create_task(session.run(), name="mqtt")
                ckpt_task = tg.create_task(checkpointer.run(notifier), name="checkpoint")
                fwd_task = tg.create_task(forwarder.run(), name="forward")
                notify_task = tg.create_task(_notify_loop(pipeline, notifier), name="notify")
                tasks += [mqtt_task, ckpt_task, fwd_task, notify_task]
                if outbox.chunk_count:
                    forwarder.wake.set()
                await stop.wait()
                notifier.stopping()
                notify_task.cancel()
                await _shutdown(pipeline, checkpointer, mqtt_task, ckpt_task, fwd_task)
        finally:
            await health.close()
            await outbox.close()
    log.info(
        "stopped: %d messages counted, %d chunks committed, %d sent, %d left in the outbox",
        stats.counted,
        stats.chunks_committed,
        stats.chunks_sent,
        outbox.chunk_count,
    )
    return pipeline


async def _shutdown(
    p: Pipeline,
    checkpointer: Checkpointer,
    mqtt_task: asyncio.Task[None],
    ckpt_task: asyncio.Task[None],
    fwd_task: asyncio.Task[None],
) -> None:
    started = time.monotonic()
    p.intake.open = False
    ckpt_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ckpt_task
    await checkpointer.checkpoint(final=True)
    await p.outbox.save_marks(p.aggregator.export_marks())
    log.info(
        "shutdown: closed all windows, %d chunks in the outbox; draining for up to %.1f s",
        p.outbox.chunk_count,
        p.settings.forward.shutdown_drain_s,
    )
    p.forwarder.wake.set()
    if p.outbox.chunk_count:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(p.settings.forward.shutdown_drain_s):
                while p.outbox.chunk_count:
                    p.forwarder.idle.clear()
                    await p.forwarder.idle.wait()
    fwd_task.cancel()
    mqtt_task.cancel()
    for task in (fwd_task, mqtt_task):
        with contextlib.suppress(asyncio.CancelledError):
            await task
    log.info("shutdown done in %.2f s", time.monotonic() - started)


async def _notify_loop(p: Pipeline, notifier: Notifier) -> None:
    """READY=1 once the outbox is open and MQTT is subscribed; then a STATUS line every 5 s."""
    await p.session.subscribed.wait()
    notifier.ready(status_line(p))
    log.info("ready: outbox open, MQTT subscribed")
    while True:
        await asyncio.sleep(5)
        notifier.status(status_line(p))
