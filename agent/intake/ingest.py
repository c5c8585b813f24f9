"""MQTT intake: the session with the broker, topic → (camera, stream), payload decode, acks.

Messages are handled synchronously in paho's callback on the event loop, straight into the
aggregator: no queue between the socket and the windows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config.credentials import client_tls_context
from agent.config.settings import (
    ID_RE,
    MQTT_MAX_PACKET_BYTES,
    PACKET_OVERHEAD_BYTES,
    MqttSettings,
    StreamSettings,
    read_secret,
)
from agent.core.backoff import Backoff
from agent.core.clock import SYSTEM_CLOCK, Clock, StepWatch
from agent.core.errors import BadTimestamp
from agent.core.ratelimit import RateLimitedLog
from agent.core.reasons import Reject
from agent.core.stats import Stats
from agent.intake.acks import AckLedger
from agent.intake.mqtt_compat import (
    FastReader,
    abandon,
    expect_late_unsubacks,
    install,
    on_connack,
    send_acks,
)
from agent.intake.timekeeping import CameraClocks, parse_event_time
from agent.windows.aggregate import Aggregator, StreamSpec

log = logging.getLogger(__name__)

GATEWAY_TIME: tuple[str, ...] = ("time_from_gateway",)
# Never subscribed to: unsubscribing from it is a harmless round trip (see confirm_acks).
BARRIER_TOPIC = "$edge-agent/ack-barrier"
# The ack barrier's wait: from this, doubling after each timeout up to the max.
BARRIER_WAIT_S = 1.0
BARRIER_WAIT_MAX_S = 8.0


@dataclass(frozen=True, slots=True)
class Route:
    camera: str
    stream: str
    spec: StreamSpec
    time_field: str | None
    time_unit: str


class TopicRouter:
    """Match topics against the `[[streams]]` patterns; first match wins."""

    # Enough for every topic of a large site (1,000 cameras x 4 streams); a flood of new ids
    # only churns it (cleared when full), so it stays small.
    _CACHE_MAX = 4096

    def __init__(self, streams: Sequence[StreamSettings]) -> None:
        self._patterns: list[tuple[list[str], StreamSettings, StreamSpec]] = [
            (
                s.topic.split("/"),
                s,
                StreamSpec(
                    numeric=s.numeric, categorical=s.categorical, max_categories=s.max_categories
                ),
            )
            for s in streams
        ]
        self._cache: dict[str, Route | Reject] = {}

    @property
    def subscriptions(self) -> list[str]:
        return list(dict.fromkeys(p[1].subscription for p in self._patterns))

    def route(self, topic: str) -> Route | Reject:
        """The route, or the reject reason (unknown_topic, bad_camera_id, bad_stream_id)."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        result = self._match(topic)
        if len(self._cache) >= self._CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _match(self, topic: str) -> Route | Reject:
        levels = topic.split("/")
        for pattern, s, spec in self._patterns:
            if len(pattern) != len(levels):
                continue
            camera = stream = None
            for p, lv in zip(pattern, levels, strict=True):
                if p == "{camera}":
                    camera = lv
                elif p == "{stream}":
                    stream = lv
                elif p != lv:
                    break
            else:
                assert camera is not None
                if not ID_RE.fullmatch(camera):
                    return Reject.bad_camera_id
                stream = stream if stream is not None else s.name
                if stream is None or not ID_RE.fullmatch(stream):
                    return Reject.bad_stream_id
                return Route(camera, stream, spec, s.time_field, s.time_unit)
        return Reject.unknown_topic


def digest(topic: bytes, payload: bytes) -> int:
    """64-bit digest of topic and payload, to recognise a redelivery of the same message."""
    h = hashlib.blake2b(topic, digest_size=8)
    h.update(b"\0")
    h.update(payload)
    return int.from_bytes(h.digest(), "big", signed=True)


class Intake:
    """One raw message in: counted into a window, or rejected with a reason; its ack owed."""

    def __init__(
        self,
        *,
        router: TopicRouter,
        aggregator: Aggregator,
        clocks: CameraClocks,
        ledger: AckLedger,
        stats: Stats,
        max_payload_bytes: int,
        max_fields: int = 256,
        max_depth: int = 8,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._max_fields = max_fields
        self._max_depth = max_depth
        self._router = router
        self._agg = aggregator
        self._clocks = clocks
        self._ledger = ledger
        self._stats = stats
        self._max_payload = max_payload_bytes
        self._clock = clock
        self._decode = msgspec.json.Decoder().decode
        self._warn = RateLimitedLog(log)
        self._steps = StepWatch()
        self.open = True

    @property
    def clocks(self) -> CameraClocks:
        """The camera clocks it judges event times by (and counts time events in)."""
        return self._clocks

    def close(self) -> None:
        """Stop counting: from now on messages stay unacked, for the broker to redeliver."""
        self.open = False

    def handle(
        self,
        topic_b: bytes,
        payload: bytes,
        mid: int,
        qos: int,
        dup: bool,
        recv_t: float | None = None,
        mono: float | None = None,
    ) -> None:
        """Count or reject one message. Never raises for any input.

        `recv_t` (wall clock) stamps the message; `mono` (monotonic) times its ack and its
        camera's idle timeout. Both default to the intake's clock."""
        if recv_t is None:
            recv_t = self._clock.wall()
        if mono is None:
            mono = self._clock.mono()
        if not self.open:
            # Shutting down: leave it unacked; the broker redelivers it to the next run.
            self._stats.rejects[Reject.ignored_at_shutdown] += 1
            if qos:
                self._ledger.ignored(mid, digest(topic_b, payload), dup)
            return
        step = self._steps.observe(recv_t, mono)
        if step:
            self._gateway_clock_stepped(step)
        st = self._stats
        st.received += 1
        # Only QoS 1 messages are acked and can be redelivered: only they need the digest.
        d = digest(topic_b, payload) if qos else 0
        if dup and qos:
            ledger = self._ledger
            ledger.dup_arrived(mid, d)
            if ledger.past_frontier(mid, d):
                pass  # new, whatever its key (agent/intake/acks.py)
            elif ledger.redelivered(mid, d, mono):
                st.redelivered_skipped += 1
                return
            elif ledger.replayed(mid, d, mono):
                st.replays_skipped += 1
                return
        window = None
        reason = None
        try:
            topic = topic_b.decode("utf-8")
        except UnicodeDecodeError:
            reason = Reject.bad_topic_encoding
        else:
            route = self._router.route(topic)
            if isinstance(route, Reject):
                reason = route
            elif len(payload) > self._max_payload:
                reason = Reject.oversized
            else:
                try:
                    reason, window = self._count(route, payload, recv_t, mono)
                except Exception:
                    # A bug, not a bad message; still this message's failure alone. Counted and
                    # acked like any reject, so the broker cannot hand it back to us forever.
                    reason = Reject.internal_error
                    self._warn.warning(
                        "internal_error_traceback",
                        "failed on a message on %r",
                        topic_b[:200],
                        exc_info=True,
                    )
        if reason is not None:
            st.rejects[reason] += 1
            self._warn.warning(reason, "rejected a message on %r: %s", topic_b[:200], reason)
        else:
            st.counted += 1
        if qos:
            self._ledger.track(mid, qos, d, window, mono, dup)

    def _gateway_clock_stepped(self, step: float) -> None:
        """The gateway's own wall clock stepped (NTP, an operator, a battery-less RTC): that is
        not the cameras' skew. Say it once and let the camera estimates start over."""
        self._stats.gateway_clock_steps += 1
        self._clocks.gateway_stepped(step)
        log.warning(
            "gateway clock stepped %+.1f s; camera clock estimates moved with it (timers run on "
            "the monotonic clock and are not affected)",
            step,
        )

    def _count(
        self, route: Route, payload: bytes, recv_t: float, mono: float
    ) -> tuple[Reject | None, Any]:
        try:
            doc = self._decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            # msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a string.
            return Reject.malformed_json, None
        except RecursionError:
            # msgspec stops at about 1,000 levels, beyond any mqtt.max_depth (<= 1000): what
            # stopped it is the nesting, whatever follows.
            return Reject.too_deep, None
        if type(doc) is not dict:
            return Reject.not_an_object, None
        if len(doc) > self._max_fields:
            return Reject.too_many_fields, None
        # Nesting depth d needs d brackets: a payload with few cannot be too deep (C-fast count).
        if payload.count(b"{") + payload.count(b"[") > self._max_depth and _too_deep(
            doc, self._max_depth
        ):
            return Reject.too_deep, None
        clocks = self._clocks
        t: float | None = None
        flags = GATEWAY_TIME
        if route.time_field is not None:
            raw = doc.get(route.time_field)
            if raw is not None:
                try:
                    event_t = parse_event_time(raw, route.time_unit)
                except BadTimestamp as e:
                    clocks.counters["bad_timestamp_used_gateway_time"] += 1
                    self._warn.warning(
                        "bad_ts",
                        "camera %s sent a bad timestamp (%s); using gateway time",
                        route.camera,
                        e,
                    )
                else:
                    stamped = clocks.stamp(route.camera, event_t, recv_t)
                    if clocks.notices:
                        for notice in clocks.take_notices():
                            # A clock going wrong at WARNING, coming back at INFO (#23).
                            back = "back within" in notice
                            log.log(logging.INFO if back else logging.WARNING, notice)
                    if stamped is None:
                        return Reject.bad_time_dropped, None
                    t, flags = stamped
        # Receive time as the cameras' consensus has it: the gateway's own while it is
        # trusted, corrected by its offset while it is not (timekeeping.CameraClocks).
        recv_t -= clocks.gateway_offset
        if t is None:
            t = recv_t
        added = self._agg.add(
            route.camera, route.stream, route.spec, doc, t, recv_t, flags=flags, mono=mono
        )
        if isinstance(added, Reject):
            if added is Reject.too_many_cameras:
                # The stamp above started a clock estimate for an id the aggregator refused:
                # drop it, or an id flood grows memory by one estimate per refused id.
                self._clocks.forget(route.camera)
            return added, None
        return None, added


def _too_deep(doc: dict[str, Any], limit: int) -> bool:
    """True when containers nest deeper than `limit` (flat payloads return at once)."""
    stack: list[tuple[Any, int]] = [(v, 2) for v in doc.values() if type(v) in (dict, list)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        items = value.values() if type(value) is dict else value
        stack.extend((v, depth + 1) for v in items if type(v) in (dict, list))
    return False


def max_packet_bytes(settings: MqttSettings) -> int:
    """The Maximum Packet Size we advertise: a PUBLISH whose payload passes
    max_payload_bytes by more than the overhead is dropped by the broker, never read by us."""
    return min(settings.max_payload_bytes + PACKET_OVERHEAD_BYTES, MQTT_MAX_PACKET_BYTES)


def connect_properties(settings: MqttSettings) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = settings.session_expiry_s
    props.ReceiveMaximum = settings.receive_maximum
    # Without it one 200 MB message costs 200 MB+ of RSS (paho reads a packet whole).
    props.MaximumPacketSize = max_packet_bytes(settings)
    return props


def suback_problems(topics: Sequence[str], granted: Sequence[int | ReasonCode]) -> list[str]:
    """What is wrong with a SUBACK for QoS 1 subscriptions: a refusal or a downgrade to QoS 0
    (broker `max_qos 0`, an ACL) would lose messages without a word. One line per topic."""
    problems = []
    for topic, code in zip(topics, granted, strict=False):
        value = code.value if isinstance(code, ReasonCode) else int(code)
        if value >= 0x80:
            name = code.getName() if isinstance(code, ReasonCode) else "failure"
            problems.append(f"MQTT subscription {topic!r} refused by the broker: {name} ({value})")
        elif value < 1:
            problems.append(
                f"MQTT subscription {topic!r} granted at QoS 0, not 1: its messages are not "
                "acknowledged and can be lost (broker max_qos or ACL)"
            )
    if len(granted) < len(topics):
        problems.append(f"MQTT SUBACK answered {len(granted)} of {len(topics)} subscriptions")
    return problems


def connect_refusal(e: aiomqtt.MqttError) -> str | None:
    """'broker refused: not authorized (135)' for a negative CONNACK, else None."""
    rc = getattr(e, "rc", None)
    if isinstance(rc, ReasonCode) and rc.packetType == PacketTypes.CONNACK:
        name = rc.getName()
        return f"broker refused: {name[:1].lower()}{name[1:]} ({rc.value})"
    return None


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """TLS to the broker when a CA or client certificate is configured (or tls = true)."""
    if not settings.tls and settings.ca_file is None and settings.cert_file is None:
        return None
    return client_tls_context(
        ca_file=settings.ca_file, cert_file=settings.cert_file, key_file=settings.key_file
    )


class MqttSession:
    """Keeps one persistent MQTT v5 session up, forever, with capped jittered backoff."""

    def __init__(
        self,
        *,
        settings: MqttSettings,
        router: TopicRouter,
        intake: Intake,
        ledger: AckLedger,
        stats: Stats,
        had_session: bool = False,
        record_session: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`had_session`: the outbox records a session this client id established at this
        broker, so a CONNACK without one means the broker lost it. `record_session` records
        it (once, after the first subscription that worked)."""
        self._s = settings
        self._router = router
        self._intake = intake
        self._ledger = ledger
        self._stats = stats
        self._had_session = had_session
        self._record_session = record_session
        self._session_task: asyncio.Task[None] | None = None
        self._session_present: bool | None = None
        self._client: aiomqtt.Client | None = None
        self.reader: FastReader | None = None
        self._barrier_wait_s = BARRIER_WAIT_S
        self.subscribed = asyncio.Event()
        self._backoff = Backoff(min_s=settings.reconnect_min_s, max_s=settings.reconnect_max_s)

    async def confirm_acks(self, timeout_s: float | None = None) -> bool:
        """A round trip (UNSUBSCRIBE of a topic we never subscribed to, answered by UNSUBACK)
        after every PUBACK sent so far: the broker handles a connection's packets in order, so
        its answer means those acks have been processed. False if it could not be had in time.

        The wait starts at 1 s (the checkpoint waits for it) and doubles after each timeout up
        to 8 s, back to 1 s after an answer: a broker that always answers in 1.5 s (an
        adversary's) otherwise never confirmed anything, and the journal and the ledger grew
        by every message (+1 MB/s of RSS at 3,000 msgs/s)."""
        client = self._client
        if client is None:
            return False
        wait_s = timeout_s if timeout_s is not None else self._barrier_wait_s
        try:
            async with asyncio.timeout(wait_s):
                await client.unsubscribe(BARRIER_TOPIC, timeout=math.inf)
        except TimeoutError:
            self._barrier_wait_s = min(BARRIER_WAIT_MAX_S, self._barrier_wait_s * 2)
            return False
        except aiomqtt.MqttError:
            return False
        self._barrier_wait_s = BARRIER_WAIT_S
        return self._client is client

    def ack(self, mids: list[int]) -> None:
        """PUBACK `mids` in order, as one write, on the current connection."""
        if self._client is not None:
            send_acks(self._client, mids)

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def is_subscribed(self) -> bool:
        """Connected and every subscription answered (readiness)."""
        return self.subscribed.is_set()

    async def run(self) -> None:
        """Connect, subscribe and hold the session; on any loss, back off and start over."""
        password = read_secret(self._s.password, self._s.password_file, "mqtt-password")
        reconnecting = False
        while True:
            client = self._client_for(password)
            self.reader = install(client, self._intake.handle, room=self._room)
            expect_late_unsubacks(client)  # the barrier's, after its wait
            self._session_present = None
            on_connack(client, self._on_connack)
            # Acks owed on an earlier connection are void; the broker redelivers those messages.
            self._ledger.new_connection()
            delay = self._s.reconnect_min_s
            try:
                async with client:
                    self._client = client
                    await self._subscribe(client, reconnecting)
                    reconnecting = False
                    # Messages reach Intake through the fast reader; this only waits for the end.
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as e:
                delay = self._failed(e)
            finally:
                self._lost()
                abandon(client)
            reconnecting = True
            await asyncio.sleep(delay)

    def _client_for(self, password: str | None) -> aiomqtt.Client:
        s = self._s
        return aiomqtt.Client(
            s.host,
            s.port,
            identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=connect_properties(s),
            keepalive=s.keepalive_s,
            username=s.username,
            password=password,
            tls_context=tls_context(s),
            timeout=s.connect_timeout_s,
        )

    async def _subscribe(self, client: aiomqtt.Client, reconnecting: bool) -> None:
        s, st = self._s, self._stats
        topics = self._router.subscriptions
        granted = await client.subscribe(
            [(topic, SubscribeOptions(qos=1, retainHandling=2)) for topic in topics]
        )
        st.mqtt_refused = None
        st.subscription_problems = suback_problems(topics, granted)
        for problem in st.subscription_problems:
            log.warning(problem)
        st.mqtt_connected = True
        st.mqtt_connected_since = time.time()
        st.mqtt_down_since = None
        if self._session_present is False and self._had_session:
            st.mqtt_sessions_lost += 1
            st.mqtt_session_lost_at = time.time()
            log.warning(
                "MQTT broker %s:%d had no session for client id %r (clean start): messages it "
                "took for us while no subscription existed are lost. It restarted without "
                "persistence or lost its database, or the session expired (mqtt.session_expiry_s "
                "= %d). docs/design.md: 'The broker forgot the session'",
                s.host,
                s.port,
                s.client_id,
                s.session_expiry_s,
            )
        if not self._had_session and self._record_session is not None:
            self._session_task = asyncio.ensure_future(self._record())
        self._had_session = True
        if reconnecting:
            st.mqtt_reconnects += 1
        log.info(
            "MQTT connected to %s:%d as %r, subscribed to %s",
            s.host,
            s.port,
            s.client_id,
            ", ".join(topics),
        )
        self._backoff.reset()
        self.subscribed.set()

    async def _record(self) -> None:
        assert self._record_session is not None
        try:
            await self._record_session()
        except Exception as e:  # the outbox's disk: reported by the checkpoint's failures
            log.warning("could not record the MQTT session in the outbox (%s)", e)

    def _room(self) -> int:
        """How many more QoS 1 messages to take: the agent holds at most Receive Maximum
        unacked, whatever the broker sends (memory bounded by configuration, G5)."""
        if self._ledger.epoch_pending:
            return 0  # a checkpoint away (see _on_connack)
        room = self._s.receive_maximum - len(self._ledger)
        st = self._stats
        held = room <= 0
        if held != st.intake_paused:
            st.intake_paused = held
            if held:
                st.intake_pauses += 1
                log.warning(
                    "holding %d unacked messages (mqtt.receive_maximum): taking no more from "
                    "the broker until acks can go out (it keeps them for us)",
                    len(self._ledger),
                )
            else:
                log.info("acks going out again: taking messages from the broker")
        return room

    def _on_connack(self, session_present: bool) -> None:
        self._session_present = session_present
        # Connected: the broker may have begun its packet ids anew (a restart from a snapshot,
        # or without the session). No message is taken (`_room`) until the outbox records it
        # (agent/intake/acks.py open_epoch). Not before the CONNACK: an agent that dies while
        # the broker is away took nothing, and its next run need not doubt its journal.
        self._ledger.open_epoch()

    def _failed(self, e: aiomqtt.MqttError) -> float:
        """A connection failed or was lost: say why; the delay before the next attempt."""
        s = self._s
        self._stats.mqtt_refused = connect_refusal(e)
        self._stats.mqtt_connect_failures += 1
        delay = self._backoff.next_delay()
        log.warning(
            "MQTT %s:%d unavailable (%s); attempt %d, reconnecting in %.1f s",
            s.host,
            s.port,
            e,
            self._backoff.attempt,
            delay,
        )
        return delay

    def _lost(self) -> None:
        st = self._stats
        self._client = None
        st.mqtt_connected = False
        st.mqtt_connected_since = None
        if st.mqtt_down_since is None:
            st.mqtt_down_since = time.time()
        self.subscribed.clear()
