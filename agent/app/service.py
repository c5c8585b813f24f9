"""Wiring: outbox, aggregator, MQTT session, checkpoint loop, forwarder; signals and shutdown order.

Shutdown (first SIGTERM/SIGINT): stop counting new messages, close every open window, last
checkpoint and acks, drain the forwarder for at most forward.shutdown_drain_s, disconnect. A
second signal exits at once (the outbox and the broker session keep everything).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

import agent.ops.memory as memory
from agent.app.faults import NO_FAULTS, Faults
from agent.config.credentials import TokenSource, client_tls_context
from agent.config.preflight import tls_problems
from agent.config.reload import plan as reload_plan
from agent.config.settings import AggregateSettings, Settings, secret_path
from agent.core.clock import SYSTEM_CLOCK, Clock
from agent.core.errors import BadChunk, ConfigError, OutboxError, StartupError
from agent.core.model import Chunk, decode_chunk
from agent.core.reasons import OutboxEvent
from agent.core.stats import Stats
from agent.durable.checkpoint import Checkpointer
from agent.durable.lock import OutboxLock
from agent.durable.outbox import Outbox, Recovery
from agent.forward.forwarder import Forwarder, tcp_probe
from agent.intake.acks import ID_SPACE, AckLedger, ReplayMemory
from agent.intake.ingest import Intake, MqttSession, TopicRouter
from agent.intake.timekeeping import CameraClocks, ClockPolicy
from agent.ops.health import Cached, HealthServer, Response, json_response
from agent.ops.logs import setup_logging
from agent.ops.metrics import render as render_metrics
from agent.ops.notify import Notifier
from agent.ops.pipeline import Pipeline
from agent.ops.status import (
    SILENT_AFTER_S,
    alive_problems,
    camera_document,
    ready_problems,
    status_document,
    status_line,
)
from agent.ops.transitions import Transitions
from agent.windows.aggregate import Aggregator

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SecondSignal(SystemExit):
    """A second SIGTERM/SIGINT during the shutdown: exit now (a SystemExit, so asyncio lets it
    through; the CLI maps it to its exit code)."""


async def run_service(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    faults: Faults = NO_FAULTS,
    notifier: Notifier | None = None,
    on_second_signal: Callable[[], None] | None = None,
    reload: Callable[[], Settings] | None = None,
) -> Pipeline:
    """Run until `stop` is set (or SIGTERM/SIGINT), then shut down in order. A second signal
    calls `on_second_signal` (the CLI: exit the process at once), else raises SecondSignal.
    SIGHUP calls `reload` (the CLI: read the config file again) and applies what may change
    live (agent/config/reload.py)."""
    service = Service(
        settings,
        faults=faults,
        notifier=notifier,
        on_second_signal=on_second_signal,
        reload=reload,
    )
    await service.serve(stop)
    assert service.pipeline is not None
    return service.pipeline


class Service:
    """The running agent: start (lock, outbox, pipeline, health), wait, ordered shutdown."""

    def __init__(
        self,
        settings: Settings,
        *,
        faults: Faults = NO_FAULTS,
        notifier: Notifier | None = None,
        on_second_signal: Callable[[], None] | None = None,
        reload: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self._on_second_signal = on_second_signal
        self._reload = reload
        self._reloading: asyncio.Task[list[str]] | None = None
        self._http: contextlib.AsyncExitStack | None = None
        self._reload_client: httpx.AsyncClient | None = None
        self.faults = faults
        self.notifier = notifier or Notifier()
        self.pipeline: Pipeline | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._signals_seen = 0

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        self._install_signals(stop)
        lock = OutboxLock(self.settings.buffer.path)
        try:
            lock.acquire()  # before anything else: a second instance must not touch a thing
        except OSError as e:
            raise StartupError(f"cannot take the outbox lock {lock.path}: {e}") from None
        try:
            outbox, recovery = await Outbox.open(
                self.settings.buffer.path, synchronous=self.settings.buffer.synchronous
            )
            try:
                await self._serve(outbox, recovery, stop)
            finally:
                await outbox.close()
        finally:
            lock.release()
        st = self.pipeline.stats if self.pipeline else None
        if st is not None:
            log.info(
                "stopped: %d messages counted, %d chunks committed, %d sent, %d left in the outbox",
                st.counted, st.chunks_committed, st.chunks_sent, outbox.chunk_count,
            )  # fmt: skip

    def _install_signals(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            self._signals_seen += 1
            if self._signals_seen > 1:
                log.warning(
                    "second signal: exiting now; the outbox and broker session keep the data"
                )
                if self._on_second_signal is not None:
                    # Raised from a signal callback, SystemExit did not always reach the loop's
                    # caller: during the final checkpoint it was lost and the drain went on
                    # for its whole forward.shutdown_drain_s (seen in CI).
                    self._on_second_signal()
                raise SecondSignal
            log.info("received %s: shutting down", signal.Signals(signum).name)
            stop.set()

        def retry_now() -> None:
            # `edge-agent forward --now`: end the forwarder's backoff at once.
            if self.pipeline is not None:
                self.pipeline.forwarder.retry_now.set()

        def on_hup() -> None:
            if self._reload is None or self.pipeline is None or self._http is None:
                log.warning("SIGHUP: nothing to reload yet (starting, or no config file)")
                return
            if self._reloading is not None and not self._reloading.done():
                log.warning("SIGHUP: a reload is still being applied; this one is ignored")
                return
            self._reloading = loop.create_task(self.reload(), name="reload")

        with contextlib.suppress(NotImplementedError, RuntimeError):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig)
            loop.add_signal_handler(signal.SIGUSR1, retry_now)
            loop.add_signal_handler(signal.SIGHUP, on_hup)

    async def reload(self) -> list[str]:
        """Read the config again and apply it, all or nothing; returns the keys applied. Every
        outcome is one log line: applied (WARNING: the running config changed), refused
        (naming the keys that need a restart, or the file's problems), or unchanged."""
        assert self._reload is not None and self.pipeline is not None and self._http is not None
        try:
            new = self._reload()
        except ConfigError as e:
            log.error("reload refused, the running config stays: %s", "; ".join(e.problems))
            return []
        live, restart = reload_plan(self.settings, new)
        if restart:
            log.warning(
                "reload refused, the running config stays: %s cannot change without a "
                "restart (systemctl restart edge-agent)",
                ", ".join(restart),
            )
            return []
        if not live:
            log.info("reload: the config file has no changes")
            return []
        p = self.pipeline
        problems = tls_problems(new) if any(k.startswith("forward.") for k in live) else []
        if problems:
            log.error("reload refused, the running config stays: %s", "; ".join(problems))
            return []
        client = None
        if any(k.startswith("forward.") for k in live):
            try:
                client = _make_client(new)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                log.error("reload refused, the running config stays: forward TLS: %s", e)
                return []
        if any(k.startswith("log.") for k in live):
            setup_logging(new.log)
        if client is not None:
            fs = new.forward
            p.forwarder.reconfigure(
                fs,
                client=client,
                token=TokenSource(fs.token, secret_path(fs.token_file, "cloud-token")),
                probe=tcp_probe(fs.url),
            )
            # The client of the previous reload goes now (an attempt still on it fails and is
            # retried, unchanged, on the new one); the first is closed at the end.
            old, self._reload_client = self._reload_client, client
            if old is not None:
                await old.aclose()
        self.settings = p.settings = new
        log.warning("reload: applied %s", ", ".join(live))
        return live

    async def _serve(self, outbox: Outbox, recovery: Recovery, stop: asyncio.Event) -> None:
        settings = self.settings
        outbox.set_fault(self.faults.hit)
        await outbox.set_quota(settings.buffer.max_bytes)
        async with contextlib.AsyncExitStack() as clients:
            # Clients made by a reload are closed with the first, at the end.
            self._http = clients
            http = await clients.enter_async_context(_http_client(settings))
            p = await build_pipeline(
                settings, outbox, recovery, http, faults=self.faults, probe_cloud=True
            )
            self.pipeline = p
            health = self._health(p)
            try:
                await health.start()
            except OSError as e:
                raise StartupError(
                    f"health.listen {settings.health.listen}: {e.strerror or e}"
                ) from None
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = self._tasks
                    mqtt_task = tg.create_task(p.session.run(), name="mqtt")
                    ckpt_task = tg.create_task(
                        p.checkpointer.run(self.notifier.progress), name="checkpoint"
                    )
                    fwd_task = tg.create_task(p.forwarder.run(), name="forward")
                    notify_task = tg.create_task(_notify_loop(p, self.notifier), name="notify")
                    tasks += [mqtt_task, ckpt_task, fwd_task, notify_task]
                    if outbox.chunk_count or outbox.batch is not None:
                        p.forwarder.wake.set()
                    await stop.wait()
                    self.notifier.stopping()
                    notify_task.cancel()
                    await shutdown_pipeline(p, ckpt_task, [fwd_task, mqtt_task])
            finally:
                await health.close()
                if self._reload_client is not None:
                    await self._reload_client.aclose()

    def _health(self, p: Pipeline) -> HealthServer:
        tasks = self._tasks

        def healthz() -> Response:
            done = [t.get_name() for t in tasks if t.done()]
            problems = alive_problems(p, done, time.monotonic())
            return json_response(
                503 if problems else 200, {"ok": not problems, "problems": problems}
            )

        def readyz() -> Response:
            problems = ready_problems(p)
            return json_response(
                503 if problems else 200, {"ok": not problems, "problems": problems}
            )

        return HealthServer(
            listen=self.settings.health.listen,
            routes={
                "/healthz": healthz,
                "/readyz": readyz,
                "/status": Cached(lambda: json_response(200, status_document(p))),
                "/status/cameras": Cached(
                    lambda: json_response(200, camera_document(p), compact=True)
                ),
                "/metrics": lambda: (200, METRICS_CONTENT_TYPE, render_metrics(p)),
                # The last attempts to send, for `edge-agent tap --sent`.
                "/status/sent": lambda: json_response(
                    200, {"sent": list(p.forwarder.sent)}, compact=True
                ),
            },
        )


async def shutdown_pipeline(
    p: Pipeline,
    ckpt_task: asyncio.Task[None],
    others: list[asyncio.Task[None]],
) -> None:
    """Stop intake, let the running checkpoint finish (never cancel it), final checkpoint
    and acks, drain the forwarder for at most forward.shutdown_drain_s, then stop."""
    started = time.monotonic()
    p.intake.close()
    p.checkpointer.stop()
    await ckpt_task
    await p.checkpointer.checkpoint(final=True)
    try:
        await p.outbox.save_marks(p.aggregator.export_marks())
    except OutboxError as e:
        # A full disk must not turn a clean stop into a traceback: what the marks protect is
        # a late message's delta after the restart; the chunks and acks are already safe.
        log.error("shutdown: could not save the window marks (%s); continuing the stop", e)
    drain_s = p.settings.forward.shutdown_drain_s
    log.info(
        "shutdown: closed all windows, %d chunks in the outbox; draining for up to %.1f s",
        p.outbox.chunk_count, drain_s,
    )  # fmt: skip
    await p.forwarder.drain(drain_s)
    for task in others:
        task.cancel()
    for task in others:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    log.info("shutdown done in %.2f s", time.monotonic() - started)


def _make_client(settings: Settings) -> httpx.AsyncClient:
    fs = settings.forward
    verify: ssl.SSLContext | bool = True
    if fs.url.startswith("https://"):
        verify = client_tls_context(
            ca_file=fs.ca_file, cert_file=fs.cert_file, key_file=fs.key_file
        )
    return httpx.AsyncClient(
        timeout=fs.timeout_s,
        follow_redirects=False,
        verify=verify,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


@contextlib.asynccontextmanager
async def _http_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with _make_client(settings) as http:
        yield http


def build_aggregator(a: AggregateSettings, cls: type[Aggregator] = Aggregator) -> Aggregator:
    """The aggregator the config asks for (`cls`: `edge-agent tap` passes a recording one)."""
    return cls(
        window_s=a.window_s,
        allowed_lateness_s=a.allowed_lateness_s,
        idle_close_s=a.idle_close_s,
        late_policy=a.late_policy,
        max_cameras=a.max_cameras,
        max_streams_per_camera=a.max_streams_per_camera,
        max_open_windows=a.max_open_windows,
    )


def _session_name(settings: Settings) -> str:
    """The broker session an outbox remembers: a client id at one broker."""
    m = settings.mqtt
    return f"{m.client_id}@{m.host}:{m.port}"


def build_clocks(a: AggregateSettings) -> CameraClocks:
    return CameraClocks(
        ClockPolicy(
            skew_policy=a.skew_policy,
            max_skew_s=a.max_skew_s,
            max_future_s=a.max_future_s,
            max_age_s=a.max_age_s,
            bad_time_policy=a.bad_time_policy,
            jump_s=a.clock_jump_s,
        )
    )


async def build_pipeline(
    settings: Settings,
    outbox: Outbox,
    recovery: Recovery,
    http: httpx.AsyncClient,
    *,
    faults: Faults = NO_FAULTS,
    clock: Clock = SYSTEM_CLOCK,
    rng: random.Random | None = None,
    send_acks: Callable[[list[int]], None] | None = None,
    can_ack: Callable[[], bool] | None = None,
    confirm_acks: Callable[[], Awaitable[bool]] | None = None,
    id_space: int = ID_SPACE,
    probe_cloud: bool = False,
) -> Pipeline:
    """Every component, restored from what the outbox kept. `probe_cloud`: the forwarder
    probes the cloud with TCP connects during a backoff (the service; not the simulation,
    whose cloud is a model)."""
    stats = Stats()
    if recovery.moved_aside is not None:
        stats.outbox_events[OutboxEvent.outbox_corrupt_moved_aside] += 1
    aggregator = build_aggregator(settings.aggregate)
    mono = clock.mono()
    snapshots: list[Chunk] = []
    for body in recovery.open_windows:
        try:
            snapshots.append(decode_chunk(body))
        except BadChunk as e:
            # Never a crash loop on a bad row: say it, count it, go on without it.
            stats.outbox_events[OutboxEvent.snapshot_unreadable] += 1
            log.error("an open-window snapshot in the outbox is unreadable (%s); skipped", e)
    restored = aggregator.restore(snapshots, now=mono)
    aggregator.import_marks(recovery.marks, now=mono)
    if recovery.marks:
        await outbox.clear_marks()
    replays = None
    if settings.mqtt.broker_autosave_interval_s <= 0 and recovery.history:
        # A run without the memory writes no rows: left, they would greet the next run that
        # has one as a frontier and keys from before this run's traffic (an adversary: 50
        # messages lost after the key went 60 -> 0 -> 60).
        await outbox.clear_history()
        recovery.history = []
    elif settings.mqtt.broker_autosave_interval_s > 0:
        replays = ReplayMemory(
            2 * settings.mqtt.broker_autosave_interval_s,
            # About an eighth of the quota on disk (8 bytes a key and its row's share).
            max_keys=max(10_000, settings.buffer.max_bytes // 128),
        )
        replays.restore(recovery.history, mono)
        recovery.history = []  # the memory holds them now: not a second copy for the run
    ledger = AckLedger(
        recovery.journal,
        replays=replays,
        frontier=replays.frontier_written if replays is not None else None,
        id_space=id_space,
        distrust=replays is not None and replays.epoch_open_written,
    )
    log.info(
        "outbox %s: %d chunks waiting, next seq %d%s; %d open windows restored; "
        "%d ack-journal entries; window marks for %d cameras",
        settings.buffer.path,
        recovery.chunks,
        recovery.next_seq,
        " (new file)" if recovery.new_file else "",
        restored,
        len(recovery.journal),
        len(recovery.marks),
    )
    router = TopicRouter(settings.streams)
    clocks = build_clocks(settings.aggregate)
    aggregator.on_forget = clocks.forget
    intake = Intake(
        router=router,
        aggregator=aggregator,
        clocks=clocks,
        ledger=ledger,
        stats=stats,
        max_payload_bytes=settings.mqtt.max_payload_bytes,
        max_fields=settings.mqtt.max_fields,
        max_depth=settings.mqtt.max_depth,
        clock=clock,
    )
    session = MqttSession(
        settings=settings.mqtt,
        router=router,
        intake=intake,
        ledger=ledger,
        stats=stats,
        had_session=recovery.mqtt_session == _session_name(settings),
        record_session=lambda: outbox.mark_session(_session_name(settings)),
    )
    fs = settings.forward
    token = TokenSource(fs.token, secret_path(fs.token_file, "cloud-token"))
    forwarder = Forwarder(
        settings=fs,
        gateway_id=settings.gateway_id,
        outbox=outbox,
        client=http,
        stats=stats,
        token=token,
        rng=rng,
        clock=clock,
        fault=faults.hit,
        probe=tcp_probe(fs.url) if probe_cloud else None,
    )
    checkpointer = Checkpointer(
        settings=settings,
        outbox=outbox,
        aggregator=aggregator,
        ledger=ledger,
        stats=stats,
        send_acks=send_acks or session.ack,
        can_ack=can_ack or (lambda: session.connected),
        on_commit=forwarder.wake.set,
        confirm_acks=confirm_acks or session.confirm_acks,
        clock=clock,
        fault=faults.hit,
        stalled=lambda: faults.reached("stall_checkpoint"),
    )
    pipeline = Pipeline(
        settings, outbox, aggregator, ledger, intake, clocks, session, forwarder, stats,
        checkpointer,
    )  # fmt: skip
    return pipeline


async def _notify_loop(p: Pipeline, notifier: Notifier) -> None:
    """READY=1 once the outbox is open and MQTT is subscribed; then a STATUS line every 5 s."""
    await p.session.subscribed.wait()
    notifier.ready(status_line(p))
    log.info("ready: outbox open, MQTT subscribed")
    memory.trim()  # what start-up freed
    last_trim = time.monotonic()
    transitions = Transitions()
    while True:
        await asyncio.sleep(5)
        notifier.status(status_line(p))
        now = time.monotonic()
        transitions.observe(
            problems=ready_problems(p),
            silent=p.aggregator.silent_cameras(now, SILENT_AFTER_S),
            now=now,
            known=p.aggregator.camera_names(),
        )
        if time.monotonic() - last_trim >= memory.TRIM_EVERY_S:
            memory.trim()
            last_trim = time.monotonic()
