"""The one place that reaches inside aiomqtt and paho: manual acks, and the PUBLISH hot path.

aiomqtt 2.x exposes neither manual acknowledgement nor the DUP flag; the paho client it wraps
does. Both hooks must be installed before the connection is entered: a resumed session's
redeliveries arrive in the same read as the CONNACK, and paho acks them on its own unless manual
acks are already on.

The hot path. paho reads one packet per wakeup, a byte at a time for the fixed header and the
length, and builds a Properties object and an MQTTMessage per PUBLISH: about 60 µs per message
here. `FastReader` takes the socket's reads instead: big reads into one buffer, every complete
packet in it handled per wakeup, a QoS 0/1 PUBLISH parsed straight to (topic, payload, packet
id, qos, dup), and every other packet (CONNACK, SUBACK, UNSUBACK, PINGRESP, DISCONNECT, a QoS 2
PUBLISH, anything malformed) handed to paho whole and unchanged, through paho's own read
function. Wakeups are bounded: after a read, the socket is left alone for `coalesce_s` (a few
milliseconds against one-second windows) so one wakeup takes many messages. PUBACKs leave as one
write per batch (`send_acks`).

aiomqtt keeps the session: connect, subscribe, keepalive, reconnect, TLS, auth.
tests/intake/test_mqtt_compat.py fails loudly if an aiomqtt or paho release breaks an
assumption; the versions it was checked with are pinned in pyproject.toml. At run time a client
without the hooks falls back to paho's own read path (correct, slower) with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from agent.core.errors import IncompatibleClient

log = logging.getLogger(__name__)

RawHandler = Callable[[paho.MQTTMessage], None]
# topic, payload, packet id (0 for QoS 0), qos, dup
PublishHandler = Callable[[bytes, bytes, int, int, bool], None]

# After a read, leave the socket alone this long: one wakeup then takes a few milliseconds of
# messages (30 at 3,000 msgs/s) instead of one.
READ_COALESCE_S = 0.01
# One recv() asks for this much; a wakeup reads until the socket would block, or READ_CAP.
READ_BYTES = 256 * 1024
READ_CAP = 4 * READ_BYTES
# While the agent may take no more messages (its unacked messages at the limit), the socket
# is looked at again this often.
HOLD_POLL_S = 0.05
UNLIMITED = 1 << 62

_PUBLISH = 0x30
_PUBACK = 0x40


# What the hot path needs of paho's internals (checked by name; the compat test checks behaviour).
_FAST_PATH_NEEDS = (
    "_sock",
    "_sock_recv",
    "_packet_queue",
    "_in_packet",
    "_last_bytes_received",
    "_call_socket_register_write",
    "on_socket_open",
    "on_socket_close",
    "loop_read",
)


def _paho(client: aiomqtt.Client) -> paho.Client:
    inner = getattr(client, "_client", None)
    if not isinstance(inner, paho.Client) or not hasattr(inner, "manual_ack_set"):
        raise IncompatibleClient(
            "aiomqtt.Client no longer wraps a paho Client with manual_ack_set; "
            "edge-agent cannot hold acks until messages are durable with this aiomqtt version"
        )
    return inner


def fast_path_problem(client: aiomqtt.Client) -> str | None:
    """Why the hot path cannot be installed on this client, or None."""
    inner = _paho(client)
    missing = [name for name in _FAST_PATH_NEEDS if not hasattr(inner, name)]
    if missing:
        return f"paho {paho.__name__} lacks {', '.join(missing)}"
    if getattr(inner, "_transport", "tcp") != "tcp":
        return "the transport is not tcp"
    return None


def install_raw_handler(client: aiomqtt.Client, handler: RawHandler) -> None:
    """Turn on manual acks and route every PUBLISH paho reads to `handler` (bypassing
    aiomqtt's queue)."""
    inner = _paho(client)
    inner.manual_ack_set(True)

    def on_message(_c: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        handler(message)

    inner.on_message = on_message


def install(
    client: aiomqtt.Client,
    handler: PublishHandler,
    *,
    coalesce_s: float = READ_COALESCE_S,
    fast: bool = True,
    room: Callable[[], int] = lambda: UNLIMITED,
) -> FastReader | None:
    """Manual acks, and every PUBLISH to `handler`: through `FastReader` when this paho allows
    it (returned), else (or with fast=False) through paho's own read path (None). `room()`:
    how many more QoS 1 messages the agent takes now (the fast path stops reading at 0)."""

    def on_message(message: paho.MQTTMessage) -> None:
        handler(message._topic, bytes(message.payload), message.mid, message.qos, message.dup)

    install_raw_handler(client, on_message)
    if not fast:
        return None
    problem = fast_path_problem(client)
    if problem is not None:
        log.warning("MQTT fast read path off (%s); using paho's reads, slower", problem)
        return None
    return FastReader(_paho(client), handler, coalesce_s=coalesce_s, room=room)


class _LateUnsuback(logging.Filter):
    """aiomqtt logs an UNSUBACK whose `unsubscribe()` was given up on as an ERROR with a
    traceback. The agent's one UNSUBSCRIBE is the ack barrier, which gives up after its wait by
    design (a slow link, a busy broker): its late answer is expected, and says nothing is wrong.
    Such records become one DEBUG line; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "in on_unsubscribe callback" in str(record.msg) and "Unexpected message ID" in str(
            record.msg
        ):
            log.debug("a late answer to an ack barrier (UNSUBACK %s), after its wait", record.args)
            return False
        return True


def expect_late_unsubacks(client: aiomqtt.Client) -> None:
    """Let `client` take an UNSUBACK after its unsubscribe() timed out without an ERROR log."""
    logger: logging.Logger = client._logger
    if not any(isinstance(f, _LateUnsuback) for f in logger.filters):
        logger.addFilter(_LateUnsuback())


def on_connack(client: aiomqtt.Client, record: Callable[[bool], None]) -> None:
    """Call `record(session_present)` on every accepted CONNACK, before aiomqtt's own handler
    (aiomqtt drops the flag). Install before the connection is entered."""
    inner = _paho(client)
    aiomqtt_on_connect: Any = inner.on_connect
    if aiomqtt_on_connect is None:
        raise RuntimeError(
            "aiomqtt installed no on_connect callback: tests/intake/test_mqtt_compat.py"
        )

    def on_connect(
        c: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        if not getattr(reason_code, "is_failure", False):
            record(bool(flags.session_present))
        aiomqtt_on_connect(c, userdata, flags, reason_code, properties)

    inner.on_connect = on_connect


def abandon(client: aiomqtt.Client) -> None:
    """The agent is done with `client` (its connection ended, or its connect failed): close
    its socket and silence its callbacks. A connect that timed out against a frozen broker
    left the socket open; when the broker woke, it answered that stale CONNECT, then dropped it
    for the newer session, and aiomqtt set an 'Unexpected disconnection' on a future no one
    awaits: asyncio logged 'Future exception was never retrieved' once per such attempt."""
    inner = _paho(client)
    inner.on_connect = None
    inner.on_disconnect = None
    with contextlib.suppress(Exception):
        inner._sock_close()
    disconnected: asyncio.Future[None] = client._disconnected
    if disconnected.done() and not disconnected.cancelled():
        disconnected.exception()  # retrieved: it was reported where it mattered, or not at all


def send_ack(client: aiomqtt.Client, mid: int, qos: int) -> None:
    """Send the PUBACK for `mid` (on the event loop thread)."""
    _paho(client).ack(mid, qos)


def send_acks(client: aiomqtt.Client, mids: Sequence[int]) -> None:
    """PUBACK each of `mids`, in order, as one write (on the event loop thread). QoS 1 only:
    the agent subscribes at QoS 1, so the broker never sends it a QoS 2 message.

    One entry in paho's outgoing queue, so the bytes cannot interleave with another packet and
    keep their order relative to what paho sends next (the ack barrier's UNSUBSCRIBE)."""
    if not mids:
        return
    inner = _paho(client)
    if not hasattr(inner, "_packet_queue"):
        for mid in mids:
            inner.ack(mid, 1)
        return
    blob = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids)
    inner._packet_queue(_PUBACK, blob, 0, 0)


class FastReader:
    """Reads paho's socket for it (see the module doc). Lives as long as its client."""

    def __init__(
        self,
        inner: paho.Client,
        handler: PublishHandler,
        *,
        coalesce_s: float = READ_COALESCE_S,
        room: Callable[[], int] = lambda: UNLIMITED,
    ) -> None:
        self._inner = inner
        self._handler = handler
        # How many more QoS 1 messages the agent takes now. At 0 nothing more is read: the
        # kernel's buffer fills, the broker keeps the messages (in flight or queued), and the
        # agent's memory stays bounded whatever the broker does (Mosquitto 2.0.11 stops
        # honouring Receive Maximum once PUBACKs have flowed).
        self._room = room
        self._coalesce_s = coalesce_s
        self._loop = asyncio.get_running_loop()
        self._sock: Any = None
        self._fd = -1
        self._buf = bytearray()
        # The one packet paho is reading through `_recv`, and what the socket said at the end.
        self._handoff = memoryview(b"")
        self._handing = False
        self._eof = False
        self._error: OSError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False
        self.wakeups = 0
        self.published = 0
        self.handed = 0
        aiomqtt_open = inner.on_socket_open
        aiomqtt_close = inner.on_socket_close

        def on_socket_open(c: paho.Client, userdata: Any, sock: Any) -> None:
            if aiomqtt_open is not None:
                aiomqtt_open(c, userdata, sock)  # queues its add_reader; ours is queued after
            self._loop.call_soon_threadsafe(self._attach, sock)

        def on_socket_close(c: paho.Client, userdata: Any, sock: Any) -> None:
            self._detach(sock)
            if aiomqtt_close is not None:
                aiomqtt_close(c, userdata, sock)

        inner.on_socket_open = on_socket_open
        inner.on_socket_close = on_socket_close
        # paho's packet reader reads through this: the one packet being handed over, or,
        # until `_attach` has run for a socket, the socket itself (paho's own recv).
        self._paho_recv: Callable[[int], bytes] = inner._sock_recv
        setattr(inner, "_sock_recv", self._recv)  # noqa: B010

    # -- the socket's life ---------------------------------------------------------------

    def _attach(self, sock: Any) -> None:
        current: Any = self._inner._sock
        if sock is None or current is not sock:
            return  # closed before the loop got here
        if self._inner._in_packet["command"]:
            # aiomqtt's reader got here first and paho is part way through a packet: let it
            # finish that one before the bytes become ours.
            self._loop.call_later(0.001, self._attach, sock)
            return
        fd: int = sock.fileno()
        self._sock, self._fd = sock, fd
        self._buf = bytearray()
        self._eof, self._error, self._handing = False, None, False
        self._loop.add_reader(self._fd, self._on_readable)  # replaces aiomqtt's reader
        self._watching = True
        # What paho's reads left decrypted in a TLS socket does not make it readable again.
        self._loop.call_soon(self._read)

    def _detach(self, sock: Any) -> None:
        if sock is not self._sock:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False
        self._sock, self._fd = None, -1

    # -- reading -------------------------------------------------------------------------
    #
    # Two modes. Watching: the socket's reader wakes us when bytes arrive. Polling: after a
    # read that found bytes, the reader is off and a timer reads again `coalesce_s` later;
    # while traffic flows it stays that way (no reader churn: with uvloop, each add_reader
    # costs an ioctl and two epoll_ctl), and the first timer read that finds nothing turns
    # the reader back on.

    def _on_readable(self) -> None:
        self._read()

    def _on_timer(self) -> None:
        self._timer = None
        self._read()

    def _read(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self.wakeups += 1
        room = self._room()
        if room <= 0 and len(self._buf) >= READ_CAP:
            self._hold()  # a bounded buffer of messages waits for room; read no more
            return
        try:
            # Without room, still read (up to READ_CAP buffered) and handle every packet but
            # a QoS 1 PUBLISH: the PINGRESP that keeps the connection, the SUBACK after a
            # reconnect's redeliveries, the barrier's UNSUBACK.
            got, more = self._fill(sock) if len(self._buf) < READ_CAP else (0, False)
            self._drain(room)
        except Exception as exc:  # a bug here must end the connection, not the reader
            log.exception("MQTT read failed; reconnecting")
            self._fail(exc)
            return
        if self._sock is not sock:
            return  # the connection ended while its packets were handled
        loop = self._loop
        if self._room() <= 0:
            self._hold()
        elif more:
            loop.call_soon(self._read)
        elif got and self._coalesce_s > 0:
            if self._watching:
                loop.remove_reader(self._fd)
                self._watching = False
            if self._timer is None:
                self._timer = loop.call_later(self._coalesce_s, self._on_timer)
        elif not self._watching:
            loop.add_reader(self._fd, self._on_readable)
            self._watching = True

    def _hold(self) -> None:
        """No room: off the socket's readiness, look again every HOLD_POLL_S (each look reads
        and handles what is not a QoS 1 message, see `_read`)."""
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False
        if self._timer is None:
            self._timer = self._loop.call_later(HOLD_POLL_S, self._on_timer)

    def _fill(self, sock: Any) -> tuple[int, bool]:
        """Read until the socket would block: (bytes read, whether it may hold more: a
        wakeup reads at most READ_CAP, then yields to the loop and comes back).

        Until it would block, not until a short read: a TLS socket returns one record (16 KB)
        per recv() while more wait in the kernel, so stopping at a short read would cap TLS
        intake at a record per wakeup."""
        buf = self._buf
        got = 0
        while got < READ_CAP:
            try:
                data = sock.recv(READ_BYTES)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return got, False
            except ssl.SSLWantWriteError:
                self._inner._call_socket_register_write()
                return got, False
            except OSError as e:
                self._error = e
                return got, False
            if not data:
                self._eof = True
                return got, False
            buf += data
            got += len(data)
            self._inner._last_bytes_received = time.monotonic()
        return got, True

    def _drain(self, room: int = UNLIMITED) -> None:
        """Handle every complete packet in the buffer, or until `room` QoS 1 messages have
        been handed over; keep the rest for the next read."""
        buf = self._buf
        n = len(buf)
        pos = 0
        handler = self._handler
        sock = self._sock
        while pos < n:
            framed = frame(buf, pos, n)
            if framed is None:
                break  # the packet is incomplete
            i, end = framed
            first = buf[pos]
            if (first & 0xF0) == _PUBLISH and (first & 0x06) < 0x04:  # QoS 0 or 1
                if room <= 0 and first & 0x06:
                    break  # no room for another QoS 1 message: it waits in the buffer
                parsed = publish_fields(buf, first, i, end)
                if parsed is not None:
                    topic, payload, mid, qos = parsed
                    self.published += 1
                    room -= qos
                    handler(topic, payload, mid, qos, bool(first & 0x08))
                    pos = end
                    continue
            # Anything else, or a PUBLISH we cannot read: paho's own code reads it, whole.
            self._hand_to_paho(buf, pos, end)
            pos = end
            if self._sock is not sock:
                return  # paho closed the connection (DISCONNECT, protocol error)
            # What paho handled may have changed the room (a CONNACK opens an epoch).
            room = min(room, self._room())
        del buf[:pos]
        if room <= 0 and frame(buf, 0, len(buf)) is not None:
            return  # a message waits for room; the end (if any) comes after it
        if (self._eof or self._error is not None) and self._sock is sock:
            # Everything before the end was handled; now let paho see the end itself.
            self._handing = False
            self._inner.loop_read()

    def _hand_to_paho(self, buf: bytearray, start: int, end: int) -> None:
        self.handed += 1
        self._handoff = memoryview(bytes(buf[start:end]))
        self._handing = True
        try:
            self._inner.loop_read()
        finally:
            self._handing = False
            self._handoff = memoryview(b"")

    def _recv(self, bufsize: int) -> bytes:
        """paho's `_sock_recv`, served from the packet being handed over; paho's own recv
        while the socket is not ours yet.

        aiomqtt's reader is on the socket from its open until `_attach` replaces it, and
        paho's connect runs in another thread, so that reader can fire first: over TLS 1.3
        the server's session tickets make the socket readable before the CONNACK. Answering
        that read with an end of stream closed the connection before the CONNACK, and
        aiomqtt waited for it until its connect timeout."""
        if self._sock is None:
            return self._paho_recv(bufsize)
        h = self._handoff
        if len(h):
            out = bytes(h[:bufsize])
            self._handoff = h[bufsize:]
            return out
        if self._handing:
            raise BlockingIOError  # this packet is done; the rest is ours
        if self._error is not None:
            raise self._error
        if self._eof:
            return b""
        raise BlockingIOError

    def _fail(self, exc: Exception) -> None:
        """End the connection: paho's socket closes, aiomqtt sees a lost connection."""
        self._error = exc if isinstance(exc, OSError) else ConnectionError(str(exc))
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            self._eof = True
            self._handing = False
            self._inner.loop_read()


def frame(buf: bytearray, pos: int, n: int) -> tuple[int, int] | None:
    """(start of the variable header, end) of the packet at buf[pos], or None while buf[:n]
    holds only part of it. Raises ConnectionError for a length of over 4 bytes."""
    i = pos + 1
    length = 0
    shift = 0
    while i < n:
        b = buf[i]
        i += 1
        length |= (b & 0x7F) << shift
        if b < 0x80:
            end = i + length
            return (i, end) if end <= n else None
        shift += 7
        if shift > 21:
            raise ConnectionError("the broker sent a packet length of over 4 bytes")
    return None


def publish_fields(
    buf: bytearray, first: int, i: int, end: int
) -> tuple[bytes, bytes, int, int] | None:
    """(topic, payload, packet id, qos) of the MQTT 5 PUBLISH in buf[i:end], or None if it
    does not parse (paho then reads it and reports the protocol error)."""
    if i + 2 > end:
        return None
    tlen = (buf[i] << 8) | buf[i + 1]
    j = i + 2 + tlen
    topic = bytes(buf[i + 2 : j])
    qos = (first >> 1) & 0x03
    mid = 0
    if qos:
        if j + 2 > end:
            return None
        mid = (buf[j] << 8) | buf[j + 1]
        j += 2
    # Properties: a variable byte integer length, then the properties, skipped.
    plen = 0
    shift = 0
    while True:
        if j >= end or shift > 21:
            return None
        b = buf[j]
        j += 1
        plen |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    j += plen
    if j > end:
        return None
    return topic, bytes(buf[j:end]), mid, qos
