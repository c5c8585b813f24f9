"""MQTT intake: the session with the broker, topic → (camera, stream), payload decode, acks.

Messages are handled synchronously in paho's callback on the event loop, straight into the
aggregator: no queue between the socket and the windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
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
# The ack barrier's side channel (SideBarrier): a second connection, under the agent's client
# id with this suffix, subscribed to this topic's level for the client id.
SIDE_CLIENT_SUFFIX = ".ack-barrier"
SIDE_TOPIC_PREFIX = "$edge-agent/ack-barrier/"
# Side round trips in a row that timed out, none of their nonces arriving late either, after
# which the side channel no longer bounds the ledger (an ACL refusing the publish): confirmations
# alternate with the in-band barrier until one answers again.
SIDE_MISSES_MAX = 3


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


def side_topic(client_id: str) -> str:
    """The side barrier's topic: one level named after the client id (a character no topic
    name may hold, or a level separator, becomes "_")."""
    return SIDE_TOPIC_PREFIX + "".join(
        c if c.isprintable() and c not in "+#/" else "_" for c in client_id
    )


def mqtt_client(
    settings: MqttSettings,
    password: str | None,
    *,
    identifier: str,
    clean_start: bool,
    properties: Properties | None = None,
) -> aiomqtt.Client:
    """An MQTT v5 client for the configured broker (address, TLS, credentials, keepalive)."""
    s = settings
    return aiomqtt.Client(
        s.host,
        s.port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=clean_start,
        properties=properties,
        keepalive=s.keepalive_s,
        username=s.username,
        password=password,
        tls_context=tls_context(s),
        timeout=s.connect_timeout_s,
    )


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """TLS to the broker when a CA or client certificate is configured (or tls = true)."""
    if not settings.tls and settings.ca_file is None and settings.cert_file is None:
        return None
    return client_tls_context(
        ca_file=settings.ca_file, cert_file=settings.cert_file, key_file=settings.key_file
    )


class SideBarrier:
    """The ack barrier through a second connection: proof that the broker has processed the
    PUBACKs sent so far, which never waits behind messages the agent has not read.

    The in-band barrier (an UNSUBSCRIBE answered by UNSUBACK) comes back on the session's own
    connection, behind every packet the broker queued for it before. Mosquitto 2.0.11 moves up
    to Receive Maximum queued messages into flight for each PUBACK of its oldest one
    (`db__message_delete_outgoing` counts the acked message's place, not what is in flight),
    so the first acks after a backlog (a failing disk healed, a restart) put the whole queue in
    front of that answer: 900,000 messages after five minutes at 3,000 msgs/s. Every message
    acked meanwhile kept its key in the ledger until the answer came: 548 MB of RSS.

    Here the session's connection publishes a nonce (QoS 0) after its PUBACKs, to a topic that
    only this second connection subscribes to. The broker handles a connection's packets in
    order, so when the nonce arrives here, the PUBACKs before it have been processed; and the
    second connection carries nothing else, so the answer does not wait behind what the first
    one has queued. Clean start, no session, QoS 0: it keeps nothing at the broker.

    Mosquitto 2.0.11 drops a connection whose PUBLISH its ACL denies, QoS 0 included. So this
    connection first publishes a nonce of its own (same user, same topic) and waits for it:
    only then does the session's connection publish any. Should the session's connection still
    end twice in a row with a nonce out on it (an ACL that tells the two client ids apart), the
    side channel is not used again until this connection has started over.
    """

    def __init__(self, settings: MqttSettings) -> None:
        self._s = settings
        self.topic = side_topic(settings.client_id)
        self.identifier = settings.client_id + SIDE_CLIENT_SUFFIX
        self._token = secrets.token_hex(8).encode()
        self._sent = 0
        self._waiting: dict[bytes, asyncio.Future[bool]] = {}
        # Subscribed and its own nonce came back (the broker lets us publish and read there).
        self._subscribed = False
        # Round trips in a row that got no answer in time, and none since (a late one resets it).
        self.misses = 0
        self.answered = 0
        # A nonce published on the session's current connection has not come back (yet); and
        # how many times in a row that connection ended so (see `session_lost`).
        self._unanswered = False
        self._lost_with_nonce = 0
        self._given_up = False
        # Set at the end of every connection attempt (subscribed or failed); `_kick` makes
        # the next attempt start now instead of after its backoff.
        self._attempted = asyncio.Event()
        self._kick = asyncio.Event()
        self._backoff = Backoff(min_s=settings.reconnect_min_s, max_s=settings.reconnect_max_s)
        self._warn = RateLimitedLog(log, interval_s=600.0)

    @property
    def up(self) -> bool:
        """Subscribed and usable: a round trip can be tried."""
        return self._subscribed and not self._given_up

    @property
    def bounds(self) -> bool:
        """Confirmations go through here and answer: the ledger may wait for them without
        reading more (MqttSession.room), since their answer does not come behind what is
        left unread."""
        return self.up and self.misses < SIDE_MISSES_MAX

    async def ready(self, timeout_s: float) -> None:
        """Before the session connects: subscribed, or a connection attempt made now has ended
        (at most `timeout_s`). A backlog floods in after the session's first acks, and the
        bound on the ledger holds from the first message only if this is up by then."""
        if self._subscribed:
            return
        self._attempted.clear()
        self._kick.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._attempted.wait()

    def session_lost(self) -> None:
        """The session's connection ended."""
        unanswered, self._unanswered = self._unanswered, False
        if not unanswered or not self._subscribed:
            self._lost_with_nonce = 0
            return
        self._lost_with_nonce += 1
        if self._lost_with_nonce >= 2 and not self._given_up:
            self._given_up = True
            log.warning(
                "MQTT ack barrier: the session's connection ended twice in a row with a nonce "
                "published to %r out (the broker refusing that PUBLISH from client id %r?); "
                "acks are confirmed in band until the barrier connection starts over; after "
                "a backlog, memory is then not bounded by mqtt.receive_maximum "
                "(docs/design.md, 'The ack barrier')",
                self.topic, self._s.client_id,
            )  # fmt: skip

    async def run(self, password: str | None) -> None:
        """Keep the connection, its subscription and its own round trip up, forever."""
        while True:
            self._kick.clear()
            client = mqtt_client(self._s, password, identifier=self.identifier, clean_start=True)
            try:
                async with client:
                    await self._open(client)
                    self._subscribed, self._given_up = True, False
                    self.misses = self._lost_with_nonce = 0
                    self._backoff.reset()
                    self._attempted.set()
                    async for message in client.messages:
                        self._answer(message.payload)
            except (aiomqtt.MqttError, _SideRefused) as e:
                self._warn.warning(
                    "side",
                    "MQTT ack barrier connection to %s:%d as %r failed (%s): acks are confirmed "
                    "on the session's own connection, behind everything the broker has queued "
                    "for it; after a backlog, memory is then not bounded by "
                    "mqtt.receive_maximum (docs/design.md, 'The ack barrier')",
                    self._s.host, self._s.port, self.identifier, e,
                )  # fmt: skip
            finally:
                self._subscribed = False
                for fut in self._waiting.values():
                    if not fut.done():
                        fut.set_result(False)
                self._attempted.set()
                abandon(client)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._backoff.next_delay()):
                    await self._kick.wait()

    async def _open(self, client: aiomqtt.Client) -> None:
        """Subscribe, then publish a nonce and wait for it here: proof that the broker lets
        this user publish and read on the topic before the session's connection publishes
        there (a refused PUBLISH ends the connection that sent it)."""
        granted = await client.subscribe(self.topic, qos=0)
        refused = [c for c in granted if (c.value if isinstance(c, ReasonCode) else c) >= 0x80]
        if refused or not granted:
            raise _SideRefused(f"subscription to {self.topic!r} refused: {refused}")
        self._sent += 1
        probe = self._token + b":%d" % self._sent
        await client.publish(self.topic, probe, qos=0)
        try:
            async with asyncio.timeout(self._s.connect_timeout_s):
                async for message in client.messages:
                    if message.payload == probe:
                        return
        except TimeoutError:
            raise _SideRefused(f"a nonce published to {self.topic!r} did not come back") from None

    def _answer(self, payload: Any) -> None:
        if not isinstance(payload, bytes | bytearray):
            return
        fut = self._waiting.get(bytes(payload))
        if fut is not None and not fut.done():
            fut.set_result(True)
        elif payload.startswith(self._token + b":"):
            # A nonce whose round trip gave up on it: slow (a broker working through 65,535
            # PUBACKs before it), not refused. The channel works; it keeps bounding the ledger.
            self.misses = 0
            self._unanswered = False

    async def round_trip(self, client: aiomqtt.Client, timeout_s: float) -> bool:
        """Publish a nonce on `client` (the session's connection, after the PUBACKs already
        sent on it) and wait for it here: True once it arrived; False after `timeout_s`, or
        if this connection ended meanwhile. Raises aiomqtt.MqttError if `client` cannot
        publish."""
        self._sent += 1
        nonce = self._token + b":%d" % self._sent
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[nonce] = fut
        self._unanswered = True
        try:
            async with asyncio.timeout(timeout_s):
                await client.publish(self.topic, nonce, qos=0, timeout=math.inf)
                answered = await fut
        except TimeoutError:
            self.misses += 1
            if self.misses == SIDE_MISSES_MAX:
                self._warn.warning(
                    "side_misses",
                    "MQTT ack barrier: %d nonces published to %r in a row did not come back "
                    "in time; acks are confirmed in band too until one does",
                    self.misses, self.topic,
                )  # fmt: skip
            return False
        finally:
            del self._waiting[nonce]
        if answered:
            self.misses = self._lost_with_nonce = 0
            self._unanswered = False
            self.answered += 1
        return answered


class _SideRefused(Exception):
    """The broker does not let the barrier connection subscribe, publish or read there."""


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
        self.side = SideBarrier(settings)
        # When the side channel has stopped answering, every other confirmation tries it.
        self._side_turn = False
        # Acks sent on this connection whose processing the broker has not confirmed yet
        # (Checkpointer.unconfirmed; set when the pipeline is built).
        self.unconfirmed: Callable[[], int] = lambda: 0
        self.subscribed = asyncio.Event()
        self._backoff = Backoff(min_s=settings.reconnect_min_s, max_s=settings.reconnect_max_s)

    async def confirm_acks(self, timeout_s: float | None = None) -> bool:
        """A round trip to the broker after every PUBACK sent so far: the broker handles a
        connection's packets in order, so its answer means those acks have been processed.
        False if it could not be had in time.

        Through the side channel (SideBarrier: a nonce published after the acks, received on a
        second connection) while it answers: its answer never waits behind messages queued for
        us. Else in band: an UNSUBSCRIBE of a topic we never subscribed to, answered by an
        UNSUBACK that comes after everything the broker queued for this connection before it
        (after a backlog, Mosquitto 2.0.11 queues all of it at the first acks).

        The wait starts at 1 s (the checkpoint waits for it) and doubles after each timeout up
        to 8 s, back to 1 s after an answer: a broker that always answers in 1.5 s (an
        adversary's) otherwise never confirmed anything, and the journal and the ledger grew
        by every message (+1 MB/s of RSS at 3,000 msgs/s)."""
        client = self._client
        if client is None:
            return False
        wait_s = timeout_s if timeout_s is not None else self._barrier_wait_s
        side = self.side
        try:
            if side.up and (side.bounds or self._side_turn):
                self._side_turn = False
                answered = await side.round_trip(client, wait_s)
            else:
                self._side_turn = True
                answered = await self._unsubscribe_barrier(client, wait_s)
        except aiomqtt.MqttError:
            return False
        if not answered:
            self._barrier_wait_s = min(BARRIER_WAIT_MAX_S, self._barrier_wait_s * 2)
            return False
        self._barrier_wait_s = BARRIER_WAIT_S
        return self._client is client

    @staticmethod
    async def _unsubscribe_barrier(client: aiomqtt.Client, wait_s: float) -> bool:
        try:
            async with asyncio.timeout(wait_s):
                await client.unsubscribe(BARRIER_TOPIC, timeout=math.inf)
        except TimeoutError:
            return False
        return True

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
        side = asyncio.create_task(self.side.run(password), name="mqtt-ack-barrier")
        try:
            await self._run(password)
        finally:
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side

    async def _run(self, password: str | None) -> None:
        reconnecting = False
        while True:
            # The side channel first: a backlog floods in after our first acks, and the
            # ledger's bound (room) holds from the first message only with it up by then.
            await self.side.ready(self._s.connect_timeout_s)
            client = self._client_for(password)
            self.reader = install(client, self._intake.handle, room=self.room)
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
        return mqtt_client(
            s, password, identifier=s.client_id, clean_start=False,
            properties=connect_properties(s),
        )  # fmt: skip

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

    def room(self) -> int:
        """How many more QoS 1 messages to take: the agent holds at most Receive Maximum
        unacked, whatever the broker sends (memory bounded by configuration, G5); and, while
        the side barrier answers, at most twice Receive Maximum unacked or acked and not yet
        confirmed (each keeps its key in the ledger until the broker's confirmation)."""
        if self._ledger.epoch_pending:
            return 0  # a checkpoint away (see _on_connack)
        limit = self._s.receive_maximum
        unacked = len(self._ledger)
        room = limit - unacked
        if self.side.bounds:
            # Deadlock-free only because the side channel's answer does not come behind the
            # messages left unread; the in-band barrier's does.
            room = min(room, 2 * limit - unacked - self.unconfirmed())
        st = self._stats
        held = unacked >= limit
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
        # or without the session). No message is taken (`room`) until the outbox records it
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
        self.side.session_lost()
        st.mqtt_connected = False
        st.mqtt_connected_since = None
        if st.mqtt_down_since is None:
            st.mqtt_down_since = time.time()
        self.subscribed.clear()
