"""`edge-agent tap`: each message on the broker as the agent would see it, one line each.

The field engineer's answer to "why is this camera's data wrong?". The verdict is the agent's
own: every message goes through a real `Intake` (topic routing, size, JSON, structure, event
time, camera clock, aggregation caps, field checks) built from the same config, fed at QoS 0 so
nothing is ever acked or journaled. Tap's own MQTT session is clean and non-persistent, with a
client id of its own (`edge-agent-tap-<pid>`): it never takes the agent's session or messages.

Its view of state (clock estimates, open windows) starts when tap starts, so a verdict that
depends on history (`late_dropped`, a clock step) is tap's, not necessarily the agent's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import threading
import time
import unicodedata
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config.settings import ID_RE, Settings, escape_controls, read_secret
from agent.core.errors import BadTimestamp, TapError
from agent.core.reasons import Reject
from agent.core.stats import Stats
from agent.core.text import rfc3339_ms
from agent.intake.acks import AckLedger
from agent.intake.ingest import Intake, Route, TopicRouter, max_packet_bytes, tls_context
from agent.intake.timekeeping import parse_event_time, unit_of
from agent.windows.aggregate import Aggregator, StreamSpec, Window

# Messages waiting to be shown; past this tap skips (and says how many): a terminal cannot
# print a busy site's full rate, and tap must not grow without bound.
QUEUE_MAX = 10_000
# Intake's own per-reject warning: tap shows the reason on the message's line instead.
_REJECT_LOG = "rejected a message on %r: %s"
# A payload that is not JSON is shown this many characters around the parser's position.
EXCERPT_CHARS = 120
# msgspec's DecodeError: "JSON is malformed: trailing comma in object (byte 57)".
_DECODE_ERROR = re.compile(r"(?:JSON is malformed: )?(?P<why>.*?)(?: \(byte (?P<at>\d+)\))?")


@dataclass(frozen=True, slots=True)
class Added:
    """What the intake handed to the aggregator for one message."""

    payload: Mapping[str, Any]
    event_t: float
    flags: tuple[str, ...]
    refused: Counter[str]


class RecordingAggregator(Aggregator):
    """The real aggregator, remembering the last message it was given (time, flags, payload)."""

    last: Added | None = None

    def add(
        self,
        camera: str,
        stream: str,
        spec: StreamSpec,
        payload: Mapping[str, Any],
        event_t: float,
        recv_t: float,
        *,
        flags: tuple[str, ...] = (),
        mono: float | None = None,
    ) -> Window | Reject:
        before = Counter(self.counters)
        result = super().add(camera, stream, spec, payload, event_t, recv_t, flags=flags, mono=mono)
        self.last = Added(payload, event_t, flags, self.counters - before)
        return result


def refused_fields(spec: StreamSpec, payload: Mapping[str, Any]) -> list[str]:
    """Which configured fields the aggregator refuses, each tried alone on a scratch aggregator
    (the real merge only counts refusals per message, not per field)."""
    refused = []
    for kind, names in (("numeric", spec.numeric), ("categorical", spec.categorical)):
        for name in names:
            if payload.get(name) is None:
                continue
            scratch = Aggregator(window_s=1, allowed_lateness_s=0.0, idle_close_s=1.0)
            one = (
                StreamSpec(numeric=(name,))
                if kind == "numeric"
                else StreamSpec(categorical=(name,))
            )
            scratch.add("c", "s", one, payload, 0.0, 0.0)
            if scratch.counters[f"bad_{kind}_field"]:
                refused.append(name)
    return refused


class Tap:
    """Classifies raw messages with the agent's intake, keeping state as the agent does (clock
    estimates, open windows) but acking, journaling and sending nothing."""

    def __init__(self, settings: Settings) -> None:
        from agent.app.service import build_aggregator, build_clocks

        self.router = TopicRouter(settings.streams)
        agg = build_aggregator(settings.aggregate, RecordingAggregator)
        assert isinstance(agg, RecordingAggregator)
        self._agg = agg
        self._clocks = build_clocks(settings.aggregate)
        agg.on_forget = self._clocks.forget
        self._stats = Stats()
        self._intake = Intake(
            router=self.router,
            aggregator=agg,
            clocks=self._clocks,
            ledger=AckLedger(),
            stats=self._stats,
            max_payload_bytes=settings.mqtt.max_payload_bytes,
            max_fields=settings.mqtt.max_fields,
            max_depth=settings.mqtt.max_depth,
        )
        self._notes: list[str] = []
        self._capture = _Capture(self._notes)
        logging.getLogger("agent.intake.ingest").addHandler(self._capture)
        logging.getLogger("agent.intake.ingest").propagate = False

    def classify(self, topic: bytes, payload: bytes, recv_t: float, mono: float) -> dict[str, Any]:
        """One message through the intake: what it was counted as, or why it was rejected."""
        st, agg = self._stats, self._agg
        rejects_before, counted_before = Counter(st.rejects), st.counted
        bad_ts_before = self._clocks.counters["bad_timestamp_used_gateway_time"]
        agg.last = None
        self._notes.clear()
        self._intake.handle(topic, payload, 0, 0, False, recv_t=recv_t, mono=mono)
        # Keep tap's own state small: its windows are never sent anywhere.
        agg.close_due(mono)
        new = st.rejects - rejects_before
        bad_ts = self._clocks.counters["bad_timestamp_used_gateway_time"] > bad_ts_before
        route = self.router.route(topic.decode("utf-8", "replace"))
        doc: dict[str, Any] = {
            "recv": rfc3339_ms(recv_t),
            "topic": topic.decode("utf-8", "replace"),
            "bytes": len(payload),
            "camera": route.camera if isinstance(route, Route) else None,
            "stream": route.stream if isinstance(route, Route) else None,
            "counted": st.counted > counted_before,
            "reason": next(iter(new), None),
        }
        if doc["reason"] == Reject.malformed_json:
            doc.update(json_problem(payload))
        added = agg.last
        if isinstance(route, Route) and added is not None:
            doc.update(self._describe(route, added, recv_t, bool(bad_ts)))
        if self._notes:
            doc["notes"] = list(self._notes)
        return doc

    def _describe(self, route: Route, added: Added, recv_t: float, bad_ts: bool) -> dict[str, Any]:
        """Event time, its unit, skew and fields of a message that reached the aggregator."""
        payload = added.payload
        out: dict[str, Any] = {}
        raw = payload.get(route.time_field) if route.time_field else None
        event_t: float | None = None
        if raw is not None and not bad_ts:
            with contextlib.suppress(BadTimestamp):
                event_t = parse_event_time(raw, route.time_unit)
        out["time_field"] = route.time_field
        out["time_raw"] = raw if isinstance(raw, int | float | str | None) else repr(raw)[:80]
        out["time_unit"] = unit_of(raw, route.time_unit) if raw is not None else None
        out["time_source"] = "payload" if event_t is not None else "gateway"
        out["event_time"] = rfc3339_ms(event_t) if event_t is not None else None
        out["skew_s"] = round(event_t - recv_t, 3) if event_t is not None else None
        clock = self._clocks.get(route.camera)
        out["skew_estimate_s"] = (
            round(clock.skew_s, 3) if clock is not None and clock.skew_s is not None else None
        )
        out["clock_suspect"] = bool(clock and clock.suspect)
        out["aggregated_at"] = rfc3339_ms(added.event_t)
        out["flags"] = list(added.flags)
        refused = refused_fields(route.spec, payload) if added.refused else []
        out["numeric"] = {f: payload[f] for f in route.spec.numeric if f in payload}
        out["categorical"] = {f: payload[f] for f in route.spec.categorical if f in payload}
        out["refused"] = refused
        out["missing"] = [
            f for f in (*route.spec.numeric, *route.spec.categorical) if payload.get(f) is None
        ]
        return out


def json_problem(payload: bytes) -> dict[str, Any]:
    """Why and where the agent's JSON decoder (msgspec) refuses `payload`: its reason, the
    byte offset (`error_at`), and the payload around it (`excerpt`, escaped, at most
    EXCERPT_CHARS characters of it; `excerpt_at`: the offset's character in the excerpt)."""
    try:
        msgspec.json.decode(payload)
    except UnicodeDecodeError:
        # msgspec says where in the string it was reading; Python says where in the payload.
        try:
            payload.decode("utf-8")
            why, at = "not UTF-8", len(payload)
        except UnicodeDecodeError as e:
            why, at = f"not UTF-8 ({e.reason})", e.start
    except msgspec.DecodeError as e:
        m = _DECODE_ERROR.fullmatch(str(e))
        assert m is not None  # the pattern matches any text
        why, at = m["why"], int(m["at"]) if m["at"] else len(payload)  # no byte: at the end
        why = why[:1].lower() + why[1:]  # "Input data was truncated"
    except (RecursionError, ValueError):
        return {}
    else:
        return {}
    text, col = excerpt(payload, at)
    return {"error": why, "error_at": at, "excerpt": text, "excerpt_at": col}


def excerpt(payload: bytes, at: int, width: int = EXCERPT_CHARS) -> tuple[str, int]:
    """At most `width` characters of `payload` around byte `at`, each character that is not
    printable escaped ('\\x0a', '\\u2028'; a byte that is not UTF-8 as '\\xff'), '…' where
    cut; and the column of byte `at` in it. No payload can move the cursor or forge a line."""
    start, end = max(0, at - 4 * width), min(len(payload), at + 4 * width)
    while 0 < start < at and 0x80 <= payload[start] < 0xC0:  # not inside a character
        start += 1
    while at < end < len(payload) and 0x80 <= payload[end] < 0xC0:
        end -= 1
    before, after = _escaped(payload[start:at]), _escaped(payload[at:end])
    room = max(width // 2, width - sum(map(len, after)))
    shown_before = _take(before[::-1], room)[::-1]
    room = width - sum(map(len, shown_before))
    shown_after = _take(after, room)
    cut_left = start > 0 or len(shown_before) < len(before)
    cut_right = end < len(payload) or len(shown_after) < len(after)
    head = ("…" if cut_left else "") + "".join(shown_before)
    return head + "".join(shown_after) + ("…" if cut_right else ""), len(head)


def _escaped(raw: bytes) -> list[str]:
    """One shown piece per character of `raw`."""
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:  # '\\x0a', never '\\n': that would read as JSON's own escape
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return out


def _take(pieces: list[str], room: int) -> list[str]:
    taken: list[str] = []
    for piece in pieces:
        room -= len(piece)
        if room < 0:
            break
        taken.append(piece)
    return taken


def _columns(text: str) -> int:
    """How many terminal columns `text` takes (wide characters two, combining marks none)."""
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


class _Capture(logging.Handler):
    """Collects what the intake logs about a message (clock notices, bad timestamps)."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg != _REJECT_LOG:
            self._into.append(record.getMessage())


def _short(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def format_line(doc: Mapping[str, Any]) -> str:
    """One line for a person: time, camera/stream, verdict, event time, skew, fields."""
    head = doc["recv"][11:]
    who = f"{doc['camera']}/{doc['stream']}" if doc.get("camera") else doc["topic"]
    if not doc["counted"]:
        line = f"{head} {who}  REJECTED {doc.get('reason')}  ({doc['bytes']} B)"
        if doc.get("error"):
            shown = doc["excerpt"]
            caret = " " * _columns("payload: " + shown[: doc["excerpt_at"]])
            line += (
                f"  {doc['error']} at byte {doc['error_at']}\n    payload: {shown}\n    {caret}^"
            )
        return _with_notes(line, doc)
    parts = [f"{head} {who}  counted"]
    if doc.get("time_source") == "payload":
        parts.append(
            f"t {doc['event_time'][11:]} ({doc['time_field']}={_short(doc['time_raw'])} "
            f"read as {doc['time_unit']})"
        )
        skew = f"skew {doc['skew_s']:+.3f} s"
        est = doc.get("skew_estimate_s")
        if est is not None:
            suspect = ", CLOCK SUSPECT" if doc["clock_suspect"] else ""
            skew += f" (camera estimate {round(est, 1) + 0.0:+.1f} s{suspect})"  # no -0.0
        parts.append(skew)
    elif doc.get("time_raw") is not None:
        parts.append(f"BAD TIMESTAMP {doc['time_field']}={_short(doc['time_raw'])}: gateway time")
    else:
        parts.append(f"no {doc.get('time_field')}: gateway time")
    if doc.get("flags"):
        parts.append("flags " + ",".join(doc["flags"]))
    fields = [f"{k}={_short(v)}" for k, v in {**doc["numeric"], **doc["categorical"]}.items()]
    if fields:
        parts.append(" ".join(fields))
    if doc.get("refused"):
        parts.append("REFUSED " + ",".join(doc["refused"]))
    if not fields and doc.get("missing"):  # one pattern often serves several streams
        parts.append("none of the configured fields (" + ",".join(doc["missing"]) + ")")
    return _with_notes("  ".join(parts), doc)


def _with_notes(line: str, doc: Mapping[str, Any]) -> str:
    return line + "".join(f"\n    note: {n}" for n in doc.get("notes", ()))


def subscriptions(settings: Settings, camera: str | None, stream: str | None) -> list[str]:
    """The agent's topic filters, narrowed to one camera and/or stream where the pattern can."""
    out = []
    for s in settings.streams:
        if stream is not None and s.name is not None and s.name != stream:
            continue
        levels = s.topic.split("/")
        subst = {"{camera}": camera or "+", "{stream}": stream or "+"}
        out.append("/".join(subst.get(lv, lv) for lv in levels))
    return list(dict.fromkeys(out))


def check_id(option: str, value: str | None) -> None:
    """Raise ValueError naming the option when an id could never match a topic."""
    if value is not None and not ID_RE.fullmatch(value):
        raise ValueError(f"{option} {value!r}: an id is 1-64 of A-Z a-z 0-9 . _ -")


@dataclass
class TapOptions:
    camera: str | None = None
    stream: str | None = None
    json: bool = False
    count: int | None = None
    seconds: float | None = None


def run_tap(settings: Settings, opts: TapOptions, out: TextIO, err: TextIO) -> int:
    """Subscribe, print a line per message until count/seconds/Ctrl-C; 0, or raise TapError."""
    topics = subscriptions(settings, opts.camera, opts.stream)
    tap = Tap(settings)
    inbox: queue.Queue[tuple[bytes, bytes, float, float]] = queue.Queue(QUEUE_MAX)
    skipped = [0]

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            inbox.put_nowait((msg._topic, bytes(msg.payload), time.time(), time.monotonic()))
        except queue.Full:
            skipped[0] += 1

    client_id = f"edge-agent-tap-{os.getpid()}"
    client = _connect(settings, client_id, topics, on_message)
    print(
        f"tap: subscribed to {', '.join(topics)} on {settings.mqtt.host}:{settings.mqtt.port} "
        f"as {client_id} (clean session, QoS 0: the agent's messages are untouched)",
        file=err,
        flush=True,
    )
    closing = threading.Event()

    def on_disconnect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not closing.is_set():  # paho reconnects by itself; on_connect subscribes again
            print(f"tap: connection to the broker lost ({rc}); reconnecting", file=err, flush=True)

    client.on_disconnect = on_disconnect
    deadline = None if opts.seconds is None else time.monotonic() + opts.seconds
    shown = 0
    stop = _stop_on_signals()
    try:
        while not stop.is_set() and (opts.count is None or shown < opts.count):
            wait_s = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait_s <= 0:
                break
            try:
                topic, payload, recv_t, mono = inbox.get(timeout=wait_s)
            except queue.Empty:
                continue
            doc = tap.classify(topic, payload, recv_t, mono)
            if opts.camera is not None and doc["camera"] not in (None, opts.camera):
                continue
            if opts.stream is not None and doc["stream"] not in (None, opts.stream):
                continue
            print(json.dumps(doc) if opts.json else format_line(doc), file=out, flush=True)
            shown += 1
    finally:
        closing.set()
        client.disconnect()
        client.loop_stop()
    if skipped[0]:
        print(f"tap: {skipped[0]} messages skipped (arriving faster than shown)", file=err)
    print(f"tap: {shown} messages shown", file=err)
    return 0


def _stop_on_signals() -> threading.Event:
    """Set by Ctrl-C and SIGTERM (`timeout 60 edge-agent tap`): both end tap cleanly, with its
    summary. SIGINT is taken even when tap was started with it ignored, as background jobs of
    a non-interactive shell are: a Ctrl-C or `kill -INT` must still stop it. A flag, not
    KeyboardInterrupt, so the signal never lands inside the queue's lock."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def _connect(
    settings: Settings, client_id: str, topics: list[str], on_message: Callable[..., None]
) -> paho.Client:
    """A clean MQTT v5 session that expires with the connection, subscribed at QoS 0."""
    s = settings.mqtt
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
    )
    if s.username is not None:
        client.username_pw_set(
            s.username, read_secret(s.password, s.password_file, "mqtt-password")
        )
    ctx = tls_context(s)
    if ctx is not None:
        client.tls_set_context(ctx)
    done = threading.Event()
    problem: list[str] = []

    def on_connect(c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            problem.append(f"broker refused: {rc.getName()} ({rc.value})")
            done.set()
            return
        opts = SubscribeOptions(qos=0, retainHandling=2)
        c.subscribe([(t, opts) for t in topics])

    def on_subscribe(_c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        for topic, code in zip(topics, codes, strict=False):
            if code.is_failure:
                problem.append(f"subscription {topic!r} refused: {code.getName()} ({code.value})")
        done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0  # nothing kept for us after we go
    props.MaximumPacketSize = max_packet_bytes(s)  # what the agent gets, and no more
    try:
        client.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=True, properties=props)
    except OSError as e:
        raise TapError(f"cannot connect to the broker at {s.host}:{s.port}: {e}") from None
    client.loop_start()
    if not done.wait(s.connect_timeout_s) or problem:
        client.disconnect()
        client.loop_stop()
        why = "; ".join(problem) or f"no answer within {s.connect_timeout_s:g} s"
        raise TapError(f"broker {s.host}:{s.port}: {why}")
    return client


def sent_line(e: Mapping[str, Any]) -> str:
    """One attempt to send, for a person: when, the seqs, size, the answer and its latency."""
    when = time.strftime("%H:%M:%S", time.localtime(e["at"])) + f".{int(e['at'] % 1 * 1000):03d}"
    answer = f"HTTP {e['status']}" if e["status"] is not None else "no answer"
    verdict = {"ok": "delivered", "retry": "kept, will retry", "split": "refused whole, split",
               "poison": "chunk refused, dead letter"}.get(e["outcome"], e["outcome"])  # fmt: skip
    text = f": {escape_controls(e['answer'])}" if e.get("answer") else ""
    return (
        f"{when} SENT {e['first_seq']}-{e['last_seq']} {e['chunks']} chunks "
        f"{e['bytes']:,} B -> {answer} in {e['latency_ms']:g} ms, {verdict}{text}"
    )


def watch_sent(
    url: str,
    out: TextIO,
    *,
    json_lines: bool = False,
    count: int | None = None,
    seconds: float | None = None,
    poll_s: float = 0.5,
) -> int:
    """Print each attempt the agent makes to send a batch, as it happens, until `count`
    lines, `seconds`, or a stop signal. Attempts made before the tap started are not shown."""
    stop = _stop_on_signals()
    deadline = time.monotonic() + seconds if seconds is not None else None
    seen: int | None = None
    shown = 0
    while not stop.is_set():
        with urllib.request.urlopen(url, timeout=5) as r:
            entries = json.loads(r.read())["sent"]
        if seen is None:  # the first look: what came before is history
            seen = max((e["n"] for e in entries), default=0)
        for e in entries:
            if e["n"] <= seen:
                continue
            seen = e["n"]
            out.write((json.dumps(e) if json_lines else sent_line(e)) + "\n")
            out.flush()
            shown += 1
            if count is not None and shown >= count:
                return 0
        if deadline is not None and time.monotonic() >= deadline:
            return 0
        stop.wait(poll_s)  # a poll period (the agent keeps the last attempts), not a wait
    return 0
