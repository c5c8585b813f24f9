"""Settings: one frozen, validated pydantic-settings model built from a TOML file plus
`EDGE_AGENT__SECTION__KEY` environment variables (which win over the file).

Nothing else in the agent reads the environment or the TOML file; the runner gets a `Settings`.
Validation is pure: the model checks values and their combinations; `load_settings` adds the
checks that a named file exists and the health host resolves; agent/config/preflight.py does
the rest of what needs the machine (directories, the service user, TLS files, DNS of the broker).

Every problem is reported at once, one line each, in the words pydantic gives and
`_format_error` shapes (tests/config/config_messages.json pins 482 of them), secrets masked.
A section built in code (`MqttSettings(port=1884)`) is validated the same way;
`model_copy(update=...)` is not validated, which the simulation relies on (a Receive Maximum
of 3, below what an operator may configure).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources import DEFAULT_PATH

from agent.core.errors import ConfigError

ENV_PREFIX = "EDGE_AGENT__"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
# The same sizes for the JSON Schema (editors check the file's text with it).
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([bBkKmMgG]|[kKmMgG][bB]|[kKmMgGtT][iI][bB])?\s*$"
# The largest size any key takes (a signed 64-bit integer: SQLite's).
MAX_SIZE = 2**63 - 1
# MQTT's largest packet (its remaining length is at most 268,435,455 bytes), the most a Maximum
# Packet Size property may say: paho refuses a larger one and `run` died of it.
MQTT_MAX_PACKET_BYTES = 268_435_455
# Room in a PUBLISH packet beyond its payload: fixed header, topic (ids are at most 64
# characters, so a routable topic is short), packet id and properties (user properties too).
PACKET_OVERHEAD_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = MQTT_MAX_PACKET_BYTES - PACKET_OVERHEAD_BYTES


def parse_size(value: object) -> object:
    """Accept 1048576, "1048576", "64KiB", "1 GiB", "10MB"; leave anything else to the int
    validation."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, '64KiB' or '1GiB'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(
                "expected a size such as 1048576, '64KiB' or '1GiB' "
                "(units: B, KB, MB, GB, KiB, MiB, GiB, TiB)"
            )
        number = m.group(1)
        if len(number.partition(".")[0].lstrip("0")) > len(str(MAX_SIZE)):
            # Hundreds of digits: past every bound, whose message names the largest (and
            # beyond float's range and, at thousands, int()'s).
            return MAX_SIZE + 1
        # Exact: float arithmetic made '4.35MB' 4349999 bytes.
        return int(Fraction(number) * _SIZE_UNITS[unit or ""])
    return value


# Text that goes on the wire as it is: MQTT forbids U+0000 in its strings (a broker drops the
# connection), and an `EDGE_AGENT__...` variable holding bytes that are not UTF-8 reads as lone
# surrogates, which no encoder takes.
_NUL = "Input should not contain NUL (U+0000)"


def _utf8_text(value: object) -> object:
    """Before pydantic's own string check, whose words for lone surrogates ("unable to parse
    raw data as a unicode string") do not say what to fix."""
    if isinstance(value, str):
        if "\0" in value:
            raise ValueError(_NUL)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "Input should be UTF-8 text (it holds bytes that are not UTF-8)"
            ) from None
    return value


def _no_nul_path(value: Path) -> Path:
    """No system call takes a NUL; bytes that are not UTF-8 are fine in a file name (Python
    hands them back to the system as they were)."""
    if "\0" in str(value):
        raise ValueError(_NUL)
    return value


# What Mosquitto refuses in a client id, user name or topic (it drops the connection, and the
# agent reconnected forever): control characters (C0 but NUL, which `_utf8_text` names; DEL;
# C1) and Unicode noncharacters, as its UTF-8 check does (tried on mosquitto 2.0).
_NONCHARACTERS = "".join(
    chr(plane + 0xFFFE) + chr(plane + 0xFFFF) for plane in range(0, 0x110000, 0x10000)
)
_MQTT_BAD_CHAR = re.compile(f"[\x01-\x1f\x7f-\x9f\ufdd0-\ufdef{_NONCHARACTERS}]")


def _mqtt_text(value: str) -> str:
    bad = _MQTT_BAD_CHAR.search(value)
    if bad is not None:
        raise ValueError(
            "expected no control character (U+0001-U+001F, U+007F-U+009F) or Unicode "
            f"noncharacter, which make the broker drop the connection (U+{ord(bad.group()):04X} "
            f"at position {bad.start() + 1})"
        )
    return value


def _finite(value: float) -> float:
    # After the bounds, whose message names the range (`timeout_s = inf`: "less than or equal
    # to 600"); a key bounded below only would take inf, and an infinite backoff or timeout
    # turns into a NaN delay later.
    if not math.isfinite(value):
        raise ValueError("Input should be a finite number")
    return value


def _check_payload_size(size: int) -> int:
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"Input should be less than or equal to {MAX_PAYLOAD_BYTES} (MQTT's largest packet, "
            f"{MQTT_MAX_PACKET_BYTES} bytes, less 64 KiB for the topic and properties)"
        )
    return size


Text = Annotated[str, BeforeValidator(_utf8_text)]
Secret = Annotated[SecretStr, BeforeValidator(_utf8_text)]
FilePath = Annotated[Path, AfterValidator(_no_nul_path)]


def _size_schema(minimum: int, maximum: int) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": minimum, "maximum": maximum},
                {"type": "string", "pattern": SIZE_PATTERN},
            ]
        }
    )


ByteSize = Annotated[
    int, BeforeValidator(parse_size), Field(ge=0, le=MAX_SIZE), _size_schema(0, MAX_SIZE)
]


FiniteFloat = Annotated[float, AfterValidator(_finite)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _resolvable_name(host: str) -> bool:
    """Whether the resolver takes `host`: an IP address, or a name the IDNA codec (which
    getaddrinfo and httpx use) encodes; it refuses an empty label and one over 63 characters."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not host.strip() or host != host.strip():
        return False
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


# A label of a host name once IDNA-encoded: what a resolver looks up ('_' too: some sites
# name hosts so, and getaddrinfo takes it).
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")


def _check_host(host: str) -> str:
    # paho refuses '' at connect, getaddrinfo a name of bad labels: `run` died of either.
    if not _resolvable_name(host):
        raise ValueError("expected a host name or IP address, e.g. '127.0.0.1'")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    # A URL, a port, brackets or quotes passed the resolver's codec and never connected.
    labels = host.encode("idna").decode("ascii").removesuffix(".").split(".")
    if all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        return host
    if "://" in host:
        raise ValueError(
            "expected a host name or IP address, not a URL, e.g. '127.0.0.1' (the port goes in "
            "mqtt.port, TLS in mqtt.tls)"
        )
    if host.startswith("[") and host.endswith("]"):
        raise ValueError("expected an IPv6 address without brackets, e.g. '::1'")
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and name:
        raise ValueError(
            f"expected a host name or IP address without a port, e.g. {name.strip('[]')!r}: "
            "the port goes in mqtt.port"
        )
    raise ValueError(
        "expected an IP address (IPv4, or IPv6 without brackets) or a host name of "
        "dot-separated labels of letters, digits, '-' and '_', e.g. '127.0.0.1' or "
        "'broker.local'"
    )


class Section(BaseModel):
    """A table of the config file: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers(cls, value: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name or "")
        kind = field.annotation if field is not None else None
        if field is None or kind not in (int, float):
            return value
        if isinstance(value, bool):  # pydantic's lax mode reads `port = true` as 1
            raise ValueError("expected a number, not true/false")
        if kind is float and isinstance(value, int):
            try:
                float(value)
            except OverflowError:
                # Too large for a float (400 digits): past every bound, so say which, as for
                # inf (pydantic would say "a valid number").
                raise ValueError(_out_of_range(field.metadata, value > 0)) from None
        return value


def _out_of_range(constraints: list[Any], positive: bool) -> str:
    """pydantic's words for an infinite value against a field's bounds, checked in its order."""
    words = {"le": "less than or equal to", "lt": "less than"}
    if not positive:
        words = {"ge": "greater than or equal to", "gt": "greater than"}
    for c in constraints:
        for attr, text in words.items():
            bound = getattr(c, attr, None)
            if bound is not None:
                return f"Input should be {text} {bound}"
    return "Input should be a finite number"


# Descriptions are the comments of config.example.toml (tests/config/test_config_schema.py
# holds them equal); a comment above several keys describes each of them.
_BROKER = "The site's MQTT broker (Mosquitto), MQTT v5."
_PASSWORD = (
    "Broker password: inline (masked in output) or, better, from a file (first line). Neither "
    "set: the systemd credential mqtt-password, which the unit loads from "
    "/etc/edge-agent/mqtt-password (a command run by hand with /etc/edge-agent/config.toml reads "
    "that file too)."
)
_BROKER_TLS = (
    "TLS to the broker (>= 1.2, hostname verified): on when tls = true or a CA / client "
    "certificate is given; the CA file, else the system store; a client certificate + key for "
    "mTLS."
)
_PAYLOAD_SHAPE = (
    "A payload with more top-level fields, or containers nested deeper, is rejected and counted "
    '("too_many_fields", "too_deep").'
)
_RECONNECT = "Reconnect backoff: capped, jittered, forever."


PASSWORD_NEEDS_USERNAME = (
    "mqtt.password needs mqtt.username: MQTT sends a password only with a user name"
)


class MqttSettings(Section):
    host: Annotated[Text, AfterValidator(_check_host)] = Field(
        default="127.0.0.1", json_schema_extra={"minLength": 1}, description=_BROKER
    )
    port: Port = Field(default=1883, description=_BROKER)
    client_id: Annotated[Text, AfterValidator(_mqtt_text)] = Field(
        default="edge-agent",
        min_length=1,
        max_length=128,
        description="Fixed client id: the broker keeps this id's session (and its "
        "unacknowledged messages).",
    )
    username: Annotated[Text, AfterValidator(_mqtt_text)] | None = Field(
        default=None, description="Broker user name, when the broker asks for one."
    )
    password: Secret | None = Field(default=None, description=_PASSWORD)
    password_file: FilePath | None = Field(default=None, description=_PASSWORD)
    tls: bool = Field(default=False, description=_BROKER_TLS)
    ca_file: FilePath | None = Field(default=None, description=_BROKER_TLS)
    cert_file: FilePath | None = Field(default=None, description=_BROKER_TLS)
    key_file: FilePath | None = Field(default=None, description=_BROKER_TLS)
    session_expiry_s: int = Field(
        default=86400,
        ge=60,
        le=4294967295,
        description="How long the broker keeps the session (and queues messages) while the "
        "agent is away.",
    )
    keepalive_s: int = Field(
        default=30,
        ge=5,
        le=3600,
        description="MQTT keepalive: the broker drops the connection after 1.5 x this without "
        "a packet.",
    )
    connect_timeout_s: FiniteFloat = Field(
        default=10.0,
        gt=0,
        le=300,
        description="How long to wait for the broker's CONNACK (a refused TLS client "
        "certificate shows up here).",
    )
    receive_maximum: int = Field(
        default=65535,
        ge=100,
        le=65535,
        description="MQTT v5 Receive Maximum: how many unacknowledged messages the broker may "
        "send us (<= 65535).",
    )
    broker_autosave_interval_s: FiniteFloat = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="The broker's snapshot interval (Mosquitto's autosave_interval, seconds). "
        "A broker that dies and restores its last snapshot sends again what was unacked when "
        "the snapshot was taken: the agent remembers what it acked for twice this long (8 "
        "bytes a message in memory and in the outbox) and acks such replays without counting "
        "them. 0: remember nothing (a broker that does not hand packet ids out in sequence).",
    )
    max_payload_bytes: Annotated[
        int,
        BeforeValidator(parse_size),
        Field(ge=0),
        AfterValidator(_check_payload_size),
        _size_schema(0, MAX_PAYLOAD_BYTES),
    ] = Field(
        default=64 * 1024,
        description='Larger payloads are counted as rejects ("oversized") and skipped. The '
        "agent also advertises MQTT Maximum Packet Size = this + 64 KiB: the broker drops "
        "(uncounted) anything larger. At most 268369919 (MQTT's largest packet, 268435455 "
        "bytes, less those 64 KiB).",
    )
    max_fields: int = Field(default=256, ge=1, le=100000, description=_PAYLOAD_SHAPE)
    max_depth: int = Field(default=8, ge=1, le=1000, description=_PAYLOAD_SHAPE)
    reconnect_min_s: FiniteFloat = Field(default=0.5, gt=0, description=_RECONNECT)
    reconnect_max_s: FiniteFloat = Field(default=30.0, gt=0, description=_RECONNECT)

    @model_validator(mode="after")
    def _cross_check(self) -> MqttSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either mqtt.password or mqtt.password_file, not both")
        if self.password is not None and self.username is None:
            # aiomqtt (paho) sends a password only with a user name: it was silently dropped.
            # (mqtt.password_file without a user name: agent/config/preflight.py, after the file.)
            raise ValueError(PASSWORD_NEEDS_USERNAME)
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mqtt.cert_file and mqtt.key_file go together")
        return self


TimeUnit = Literal["auto", "s", "ms", "us", "ns", "rfc3339"]
_TOPIC_LEVEL_RE = re.compile(r"[^+#{}]*")
# MQTT's longest topic (a two-byte length, in UTF-8 bytes).
MQTT_MAX_TOPIC_BYTES = 65535
# What the agent takes as a camera or stream id (agent/intake/ingest.py refuses anything else).
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _check_id(value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise ValueError("an id is 1-64 of A-Z a-z 0-9 . _ -")
    return value


def _check_topic(topic: str) -> str:
    levels = topic.split("/")
    if "{camera}" not in levels:
        raise ValueError("the topic needs a whole level '{camera}', e.g. 'site/cam/{camera}/det'")
    for level in levels:
        if level in ("{camera}", "{stream}"):
            continue
        if not level or not _TOPIC_LEVEL_RE.fullmatch(level):
            raise ValueError(
                "topic levels are literal names or exactly '{camera}' / '{stream}' "
                "(no '+', '#', empty levels or partial placeholders)"
            )
    if levels.count("{camera}") > 1 or levels.count("{stream}") > 1:
        raise ValueError("'{camera}' and '{stream}' may appear once each")
    size = len(topic.encode("utf-8"))
    if size > MQTT_MAX_TOPIC_BYTES:
        raise ValueError(
            f"a topic is at most {MQTT_MAX_TOPIC_BYTES} bytes of UTF-8 (MQTT's limit), not {size}"
        )
    return topic


_FIELDS = "Fields aggregated as numbers (n, sum, sumsq, min, max, last) and as category counts."
# For editors: a whole level '{camera}' (check-config says the rest).
TOPIC_PATTERN = r"(^|/)\{camera\}(/|$)"


def _each_once(names: tuple[str, ...]) -> tuple[str, ...]:
    # A field listed twice was aggregated twice per message: the cloud counted it double.
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"list each field once; listed more than once: {twice}")
    return names


FieldNames = Annotated[tuple[Text, ...], AfterValidator(_each_once)]


class StreamSettings(Section):
    topic: Annotated[Text, AfterValidator(_mqtt_text), AfterValidator(_check_topic)] = Field(
        json_schema_extra={"pattern": TOPIC_PATTERN},
        description="The topic pattern: levels are literal names, {camera} and {stream}.",
    )
    name: Annotated[Text, AfterValidator(_check_id)] | None = Field(
        default=None,
        json_schema_extra={"pattern": f"^{ID_RE.pattern}$"},
        description="The stream's name, only when the topic has no {stream} level.",
    )
    time_field: Text | None = Field(
        default="ts",
        description="Payload field with the event time; missing -> gateway clock, chunk "
        "flagged time_from_gateway.",
    )
    time_unit: TimeUnit = Field(
        default="auto",
        description='"auto" (epoch s/ms/us/ns told apart by magnitude, or an RFC 3339 '
        'string), "s", "ms", "us", "ns" or "rfc3339".',
    )
    numeric: FieldNames = Field(
        default=(), json_schema_extra={"uniqueItems": True}, description=_FIELDS
    )
    categorical: FieldNames = Field(
        default=(), json_schema_extra={"uniqueItems": True}, description=_FIELDS
    )
    max_categories: int = Field(
        default=32,
        ge=1,
        le=10000,
        description="Distinct values kept per categorical field per window; the rest count "
        'under "__other__".',
    )

    @model_validator(mode="after")
    def _cross_check(self) -> StreamSettings:
        has_placeholder = "{stream}" in self.topic.split("/")
        if has_placeholder == (self.name is not None):
            raise ValueError(
                "give a stream either a '{stream}' level in its topic or a name, one of the two"
            )
        overlap = set(self.numeric) & set(self.categorical)
        if overlap:
            raise ValueError(f"fields both numeric and categorical: {sorted(overlap)}")
        return self

    @property
    def subscription(self) -> str:
        """The MQTT filter that matches this pattern."""
        return "/".join(
            "+" if lv in ("{camera}", "{stream}") else lv for lv in self.topic.split("/")
        )


_CAPS = (
    "Caps that keep memory bounded whatever the cameras send. A message over a cap is acked "
    'and not counted, counted instead as a reject ("too_many_cameras": a new camera id while '
    'max_cameras are tracked; "too_many_streams": a new stream of a camera that has '
    'max_streams_per_camera streams with open windows; "too_many_open_windows"). At the camera '
    "cap, ids silent for 60 s (or 2 x idle_close_s) with nothing open are forgotten, so an id "
    "flood does not lock honest cameras out."
)
_SKEW = (
    "Per camera, the agent estimates its clock skew (event time - gateway receive time, robust "
    "to network delay: a windowed minimum). When the estimate exceeds max_skew_s, skew_policy "
    'decides: "flag" keeps camera time and flags the chunks clock_suspect; "restamp" shifts '
    'event times by the estimate and flags them restamped; "gateway" uses the receive time '
    "while the clock is bad (flag time_from_gateway). Counts are never lost under any policy."
)
_BAD_TIME = (
    "Event times more than max_future_s ahead of the gateway clock or more than max_age_s "
    'behind it: "restamp" uses the receive time and flags bad_time; "drop" drops them '
    "(counted)."
)


class AggregateSettings(Section):
    window_s: int = Field(default=1, ge=1, le=3600, description="Window width in seconds.")
    allowed_lateness_s: FiniteFloat = Field(
        default=2.0,
        ge=0,
        le=3600,
        description="A camera's window closes when that camera's newest event time passes "
        "window end + this.",
    )
    idle_close_s: FiniteFloat = Field(
        default=5.0,
        gt=0,
        le=86400,
        description="...or when the camera has been silent this long (gateway clock).",
    )
    late_policy: Literal["delta", "drop"] = Field(
        default="delta",
        description='A message for a closed window: "delta" sends it as a late delta '
        '(rev > 0); "drop" counts and drops it.',
    )
    max_cameras: int = Field(default=10000, ge=1, description=_CAPS)
    max_streams_per_camera: int = Field(default=32, ge=1, description=_CAPS)
    max_open_windows: int = Field(default=200000, ge=1, description=_CAPS)
    max_skew_s: FiniteFloat = Field(default=30.0, gt=0, description=_SKEW)
    skew_policy: Literal["flag", "restamp", "gateway"] = Field(default="flag", description=_SKEW)
    clock_jump_s: FiniteFloat = Field(
        default=60.0,
        gt=0,
        description="A sample this far from the estimate is a possible clock step (reset to "
        "1970, a jump of hours, ms sent as s); three consistent ones move the estimate at once. "
        "Newer-than-expected samples are acted on immediately.",
    )
    max_future_s: FiniteFloat = Field(default=300.0, gt=0, description=_BAD_TIME)
    max_age_s: FiniteFloat = Field(default=7 * 86400.0, gt=0, description=_BAD_TIME)
    bad_time_policy: Literal["restamp", "drop"] = Field(default="restamp", description=_BAD_TIME)


_ACK_DELAY = (
    "Open-window state is saved (so its messages can be acked) when the oldest unacknowledged "
    "message is this old, or when unacked messages reach ack_pressure_ratio x receive_maximum."
)


def _on_disk(path: Path) -> Path:
    # SQLite's name for a database in memory: `run` died of it (the outbox needs a file, and
    # would lose everything at a restart). '' is '.', a directory: agent/config/preflight.py
    # says so.
    if str(path) == ":memory:":
        raise ValueError(
            "expected a file path: ':memory:' is SQLite's in-memory database, and the outbox "
            "must survive a restart"
        )
    return path


class BufferSettings(Section):
    path: Annotated[FilePath, AfterValidator(_on_disk)] = Field(
        default=Path("/var/lib/edge-agent/buffer.sqlite3"),
        description="The SQLite outbox (plus -wal and -shm files next to it).",
    )
    max_bytes: Annotated[
        int,
        BeforeValidator(parse_size),
        Field(ge=1024**2, le=MAX_SIZE),
        _size_schema(1024**2, MAX_SIZE),
    ] = Field(
        default=1024**3,
        description="The outbox's size cap: chunks, open-window snapshots and the ack journal "
        "(see overflow).",
    )
    synchronous: Literal["off", "normal", "full", "extra"] = Field(
        default="full",
        description='SQLite synchronous: "full" survives power loss (G4); "normal" may lose '
        'the last commits on power loss (not on a process crash); "off" and "extra" as in '
        "SQLite.",
    )
    checkpoint_interval_ms: int = Field(
        default=250,
        ge=10,
        le=60000,
        description="How often closed chunks are committed and the MQTT messages they hold "
        "acknowledged.",
    )
    max_ack_delay_ms: int = Field(default=10000, ge=100, le=3600000, description=_ACK_DELAY)
    ack_pressure_ratio: FiniteFloat = Field(default=0.6, gt=0, lt=1, description=_ACK_DELAY)
    durability: Literal["message", "window"] = Field(
        default="message",
        description='When a message is acknowledged to the broker: "message" once it is '
        "committed, in its chunk or its open window's saved state (at most one checkpoint "
        "after it arrives: a power cut that takes the broker with the agent loses nothing the "
        'agent received); "window" once its window\'s chunk is committed (a few seconds: until '
        "then its only copy is the broker's, fewer flash writes).",
    )
    overflow: Literal["drop_oldest", "backpressure"] = Field(
        default="backpressure",
        description='What to do when max_bytes is reached: "backpressure" (stop acking; the '
        'broker holds messages) or "drop_oldest" (counted and logged).',
    )


_URL_PORT_PROBLEM = "expected an http(s) URL with a port from 1 to 65535"


def _check_url(url: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):  # a trailing newline, too
        raise ValueError("expected an http:// or https:// URL without control characters")
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise ValueError("expected an http:// or https:// URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port out of 0..65535, not a number, or a broken [IPv6] host
        raise ValueError(_URL_PORT_PROBLEM) from None
    if port == 0:
        raise ValueError(_URL_PORT_PROBLEM)
    if not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    if not _resolvable_name(parts.hostname):
        raise ValueError(
            "expected an http:// or https:// URL whose host is an IP address or a name of "
            "dot-separated labels of 1-63 characters"
        )
    try:
        # What the forwarder will build from it (httpx parses the URL and IDNA-decodes the
        # host for the Host header): '256.1.1.1', 'xn--', a host IDNA 2008 refuses, a URL over
        # 64 KiB passed the checks above and failed every send.
        httpx.Request("POST", url)
    except (httpx.InvalidURL, ValueError) as e:  # idna's errors are UnicodeErrors
        userinfo = url.partition("://")[2].rpartition("@")[0]
        why = str(e) if not userinfo or userinfo not in str(e) else type(e).__name__
        raise ValueError(
            f"expected an http:// or https:// URL the HTTP client takes ({why})"
        ) from None
    return url


_TOKEN = (
    "Bearer token: inline (masked in output) or from a file (first line, re-read when it "
    "changes). Neither set: the systemd credential cloud-token, which the unit loads from "
    "/etc/edge-agent/cloud-token (a command run by hand with /etc/edge-agent/config.toml reads "
    "that file too, so `check-config --connect` tries the token the service sends)."
)
_CLOUD_TLS = (
    "TLS to the cloud: the CA file, else the system store; a client certificate + key for mTLS."
)
_BATCH = "A batch holds at most this many chunks and this many bytes of chunk JSON (before gzip)."
_BACKOFF = "Retry backoff after a failed batch: capped exponential with full jitter, forever."
_PACE = (
    "Pace (replay after an outage, and live data behind it): at most this many chunks/s and, "
    "if not 0, bytes/s of batch bodies on the wire. On 429/503 the pace is halved (not below "
    "min_chunks_per_s); it grows back by a tenth of the maximum per batch answered within "
    "fast_response_s. 50,000 chunks/s drains an hour of 300 cameras x 3 streams in ~65 s."
)


# What an HTTP header value may carry here: printable ASCII (RFC 9110 allows no control
# characters; httpx refuses non-ASCII by raising when the request is built).
_BAD_HEADER_CHAR = re.compile(r"[^\x20-\x7e]")


def token_problem(token: str) -> str | None:
    """Why `token` cannot go in an Authorization header, or None. Never quotes the token.
    The one rule for an inline forward.token (checked here) and a token file
    (agent/config/credentials.py TokenSource, as it re-reads it)."""
    if not token:
        return "is empty"
    bad = _BAD_HEADER_CHAR.search(token)
    if bad is not None:
        return (
            f"has a character not allowed in an HTTP header (U+{ord(bad.group()):04X} at "
            f"position {bad.start() + 1}; only printable ASCII is)"
        )
    return None


def _usable_token(token: SecretStr) -> SecretStr:
    # TokenSource refused it at run time and sent without a token: every batch got a 401.
    raw = token.get_secret_value()
    why = token_problem(raw.strip())
    if why is not None:
        raise ValueError(f"the token {'is only whitespace' if raw and not raw.strip() else why}")
    return token


class ForwardSettings(Section):
    url: Annotated[Text, AfterValidator(_check_url)] = Field(
        default="http://127.0.0.1:8080/ingest",
        description="The cloud ingestion endpoint: batches are POSTed here (the wire format "
        "in docs/reference.md).",
    )
    token: Annotated[Secret, AfterValidator(_usable_token)] | None = Field(
        default=None, description=_TOKEN
    )
    token_file: FilePath | None = Field(default=None, description=_TOKEN)
    ca_file: FilePath | None = Field(default=None, description=_CLOUD_TLS)
    cert_file: FilePath | None = Field(default=None, description=_CLOUD_TLS)
    key_file: FilePath | None = Field(default=None, description=_CLOUD_TLS)
    timeout_s: FiniteFloat = Field(
        default=10.0,
        gt=0,
        le=600,
        description="How long to wait for the cloud's answer to one batch; a timeout is "
        "retried (same batch).",
    )
    max_batch_chunks: int = Field(default=500, ge=1, le=100000, description=_BATCH)
    max_batch_bytes: ByteSize = Field(default=1024**2, description=_BATCH)
    linger_ms: int = Field(
        default=200,
        ge=0,
        le=60000,
        description="Wait this long after the first new chunk to fill a batch (a full backlog "
        "is sent at once).",
    )
    gzip: bool = Field(
        default=True,
        description="Send batch bodies gzip-compressed (Content-Encoding: gzip).",
    )
    backoff_min_s: FiniteFloat = Field(default=0.5, gt=0, description=_BACKOFF)
    backoff_max_s: FiniteFloat = Field(default=60.0, gt=0, description=_BACKOFF)
    probe_interval_s: FiniteFloat = Field(
        default=2.0,
        ge=0,
        le=3600,
        description="While a backoff follows a failure without any HTTP answer (connection "
        "refused, reset, unreachable), open a TCP connection to the cloud this often and send "
        "as soon as one succeeds: delivery resumes within seconds of the cloud's return, "
        "whatever the backoff reached. 0: wait the whole backoff.",
    )
    shutdown_drain_s: FiniteFloat = Field(
        default=5.0,
        ge=0,
        le=600,
        description="At shutdown, keep forwarding for at most this long; the rest stays in "
        "the outbox.",
    )
    max_chunks_per_s: FiniteFloat = Field(default=50000.0, gt=0, description=_PACE)
    max_bytes_per_s: ByteSize = Field(default=0, description=_PACE)
    min_chunks_per_s: FiniteFloat = Field(default=50.0, gt=0, description=_PACE)
    fast_response_s: FiniteFloat = Field(default=1.0, gt=0, description=_PACE)
    alert_after_s: FiniteFloat = Field(
        default=300.0,
        ge=1,
        le=30 * 86400,
        description="When the cloud has been unreachable this long, or the oldest unsent chunk "
        "is this old, it is a problem in /readyz, /status and `edge-agent status` (exit 1), "
        "with its age: alert on it.",
    )

    @model_validator(mode="after")
    def _cross_check(self) -> ForwardSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set either forward.token or forward.token_file, not both")
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("forward.backoff_max_s must be >= forward.backoff_min_s")
        if self.min_chunks_per_s > self.max_chunks_per_s:
            raise ValueError("forward.min_chunks_per_s must be <= forward.max_chunks_per_s")
        return self


def _check_listen(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("expected HOST:PORT, e.g. '127.0.0.1:9108'")
    if not 1 <= int(port) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535, e.g. '127.0.0.1:9108'")
    return listen


# For editors: HOST:PORT with a port of 1-65535 (check-config also resolves the host).
LISTEN_PATTERN = (
    r"^.+:0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
)


class HealthSettings(Section):
    listen: Annotated[Text, AfterValidator(_check_listen)] = Field(
        default="127.0.0.1:9108",
        json_schema_extra={"pattern": LISTEN_PATTERN},
        description="Local health endpoint (loopback by default).",
    )

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")


_LOG = '"debug", "info", "warning" or "error"; "text" or "json" lines on stdout.'


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description=_LOG)
    format: Literal["text", "json"] = Field(default="text", description=_LOG)


def _default_streams() -> tuple[StreamSettings, ...]:
    return (
        StreamSettings(
            topic="site/cam/{camera}/{stream}",
            numeric=("conf", "level", "temp_c", "fps"),
            categorical=("cls", "zone", "status"),
        ),
    )


def _at_least_one(streams: tuple[StreamSettings, ...]) -> tuple[StreamSettings, ...]:
    if not streams:
        raise ValueError("Tuple should have at least 1 item after validation, not 0")
    return streams


def _check_gateway_id(gateway_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", gateway_id):
        raise ValueError("use letters, digits, '.', '_' and '-' only")
    return gateway_id


class Settings(BaseSettings):
    """The agent's configuration. Built in code (`Settings(gateway_id=...)`) it takes only what
    the code passes; `load_settings` adds the TOML file and the environment."""

    model_config = SettingsConfigDict(
        title="edge-agent configuration",
        extra="forbid",
        frozen=True,
        # The file's keys are exact; the environment's names are not (see _Environment).
        case_sensitive=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
    )

    gateway_id: Annotated[
        str,
        Field(min_length=1, max_length=128),
        BeforeValidator(_utf8_text),
        AfterValidator(_check_gateway_id),
    ] = Field(
        json_schema_extra={"pattern": "^[A-Za-z0-9._-]+$"},
        description="Identifies this gateway to the cloud; part of every Idempotency-Key. "
        "Letters, digits, . _ - Unique per gateway: the cloud deduplicates by (gateway, seq), "
        "so two gateways with one id silently lose each other's data. check-config refuses "
        "this example value: set your own.",
    )
    mqtt: MqttSettings = MqttSettings()
    # At least one, checked after the items: pydantic's min_length also reports a list whose
    # items all failed as empty, a second line for one mistake.
    streams: Annotated[tuple[StreamSettings, ...], AfterValidator(_at_least_one)] = Field(
        default_factory=_default_streams,
        json_schema_extra={"minItems": 1},
        description="One [[streams]] entry per topic pattern. Placeholders are whole topic "
        "levels: {camera} is required; {stream} names the stream from the topic, otherwise give "
        "`name`. Camera and stream ids must match [A-Za-z0-9._-]{1,64}; other ids are rejected "
        "and counted.",
    )
    aggregate: AggregateSettings = AggregateSettings()
    buffer: BufferSettings = BufferSettings()
    forward: ForwardSettings = ForwardSettings()
    health: HealthSettings = HealthSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Built in code, exactly what the code passes: tests and the simulation must not pick
        # up an EDGE_AGENT__ variable of the shell. load_settings passes its own sources.
        return (init_settings,)

    @model_validator(mode="after")
    def _cross_check(self) -> Settings:
        names: set[tuple[str, str | None]] = set()
        for s in self.streams:
            key = (s.subscription, s.name)
            if key in names:
                raise ValueError(f"two [[streams]] entries have the same topic {s.topic!r}")
            names.add(key)
        filters = sorted({s.subscription for s in self.streams})
        for i, a in enumerate(filters):
            for b in filters[i + 1 :]:
                if _overlap(a, b):
                    raise ValueError(
                        f"two [[streams]] topics can match the same topic ({a!r} and {b!r}): "
                        "the broker would deliver such a message once per subscription and "
                        "it would be counted twice; make them disjoint"
                    )
        return self


def _overlap(a: str, b: str) -> bool:
    """Whether two MQTT filters of '+' and literal levels can match one topic."""
    la, lb = a.split("/"), b.split("/")
    return len(la) == len(lb) and all(x == y or "+" in (x, y) for x, y in zip(la, lb, strict=True))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file (`edge-agent check-config --schema`): what an editor
    (taplo, Even Better TOML) needs to complete and check it. Generated from the model, as
    draft-07 (`definitions`): taplo's validator has long stopped at drafts 4-7; pydantic's
    keywords are all draft-07's."""
    schema = Settings.model_json_schema(mode="validation", ref_template="#/definitions/{model}")
    schema = {"definitions": schema.pop("$defs"), **schema}
    schema["description"] = (
        "The edge-agent config file (/etc/edge-agent/config.toml). Every key has a default but "
        "gateway_id. Any key can be overridden by an environment variable "
        "EDGE_AGENT__SECTION__KEY; `edge-agent check-config --config FILE` checks a file."
    )
    return {"$schema": "http://json-schema.org/draft-07/schema#", **schema}


# Loading: the TOML file and the environment, as pydantic-settings sources.


class _TomlFile(TomlConfigSettingsSource):
    """pydantic-settings' TOML source, except that a file named but missing, unreadable or not
    TOML is a ConfigError naming it (pydantic-settings skips a missing file: a typo in
    --config would run the defaults). `overrides` replace top-level keys of the file."""

    def __init__(
        self, settings_cls: type[BaseSettings], path: str | None, overrides: Mapping[str, Any]
    ) -> None:
        self._overrides = dict(overrides)
        # Named as given: Path('') and Path('.') equal pydantic-settings' DEFAULT_PATH, which
        # it takes for "no file": `--config ''` read nothing and ran the defaults.
        self._name = path
        super().__init__(settings_cls, toml_file=path if path is not None else DEFAULT_PATH)

    @staticmethod
    def _existing_files(files: Any) -> list[Any]:
        return [Path(files)] if isinstance(files, str | Path) else []

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        p = Path(file_path)
        name = repr(self._name if self._name is not None else str(p))
        try:
            if self._name == "":
                raise FileNotFoundError
            return tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"config file {name} not found"]) from None
        except IsADirectoryError:
            raise ConfigError([f"config file {name} is a directory"]) from None
        except OSError as e:
            raise ConfigError([f"config file {name} cannot be read: {e.strerror}"]) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"config file {name} is not valid TOML: {e}"]) from None
        except RecursionError:  # tomllib recurses per nested array or inline table
            deep = f"config file {name} is not valid TOML: nested too deeply"
            raise ConfigError([deep]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"config file {name} is not UTF-8 text"]) from None

    def __call__(self) -> dict[str, Any]:
        return {**super().__call__(), **self._overrides}


def _json_looking(value: str) -> bool:
    return value.lstrip()[:1] in ("[", "{")


# The deepest JSON an `EDGE_AGENT__...` variable may hold: far more than any key takes (a
# stream is 3 levels), far less than where json.loads runs out of stack (about 1000 levels, and
# fewer inside pydantic-settings, which parses the value again deeper in the stack).
MAX_ENV_JSON_DEPTH = 100
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')


def _json_depth(value: str) -> int:
    """How deep the brackets of `value` nest, outside JSON strings (without parsing it)."""
    depth = deepest = 0
    for c in _JSON_STRING_RE.sub("", value):
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


class _Environment(EnvSettingsSource):
    """pydantic-settings' env source: `EDGE_AGENT__SECTION__KEY` (nested delimiter `__`,
    names case-insensitive), over the file. Three rules of ours on top:

    - a value that starts with `[` or `{` is JSON, for any key (`EDGE_AGENT__STREAMS='[...]'`,
      `EDGE_AGENT__MQTT='{"port": 1884}'`); anything else, or JSON that does not parse, stays
      text, which the validation parses like the TOML's and names the key if it cannot;
    - a variable for no key (`EDGE_AGENT__MQTT__HOTS`, `EDGE_AGENT__NOPE`) is refused by name
      as an unknown key, not ignored;
    - two variables for one key (names differ in case only), or one inside a key another sets
      whole, are refused naming both (`environment_problems`), not settled by sort order.
    """

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(
            settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX, env_nested_delimiter="__"
        )

    def field_is_complex(self, field: Any) -> bool:
        return True  # every value goes through decode_complex_value, which decides by its text

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        if isinstance(value, str) and _json_looking(value):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        prefix = ENV_PREFIX.lower()  # as the names in env_vars (case-insensitive)
        for name, value in self.env_vars.items():
            if not name.startswith(prefix):
                continue
            top, _, rest = name[len(prefix) :].partition("__")
            if top not in self.settings_cls.model_fields and top not in data:
                data[top] = {rest: value} if rest else value
        return data


def environment_problems(environ: Mapping[str, str]) -> list[str]:
    """What pydantic-settings would settle silently, or report without naming the variable, in
    the `EDGE_AGENT__...` variables: two for one key (names are case-insensitive), one inside a
    key another sets whole, a name with an empty part (`EDGE_AGENT__MQTT____PORT`), one inside
    `streams` (a list: set whole), and JSON nested deeper than MAX_ENV_JSON_DEPTH (100) levels.
    One line each, naming the variables (control characters escaped)."""
    source: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    prefix = ENV_PREFIX.lower()
    for name, value in sorted(environ.items()):
        lowered = name.lower()
        if not lowered.startswith(prefix):
            continue
        path = tuple(lowered[len(prefix) :].split("__"))
        if "" in path:
            problems.append(escape_controls(f"{name}: an empty name between '__' separators"))
            continue
        if _json_looking(value) and _json_depth(value) > MAX_ENV_JSON_DEPTH:
            problems.append(
                escape_controls(
                    f"{name}: the JSON is nested too deeply (more than {MAX_ENV_JSON_DEPTH} levels)"
                )
            )
            continue
        clash = next(
            (source[path[:i]] for i in range(1, len(path) + 1) if path[:i] in source), None
        ) or next((n for p, n in source.items() if p[: len(path)] == path), None)
        if clash is not None:
            problems.append(
                escape_controls(
                    f"{name} and {clash} both set {'.'.join(path[: min(len(path), 2)])}: "
                    "keep one (names are case-insensitive; a list or table is set whole, as JSON)"
                )
            )
            continue
        if path[0] == "streams" and len(path) > 1:
            problems.append(
                escape_controls(f"{name}: set streams whole, as JSON: {ENV_PREFIX}STREAMS='[...]'")
            )
            continue
        source[path] = name
    return problems


# What a terminal or a log reader takes for the end of a line or a command: a name or key
# holding one forged extra "config error:" lines. (Values are printed with repr, which escapes.)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` with its control characters escaped as Python does ('\\n', '\\x1b')."""
    return _CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)


# Text that may hold a secret: a whole table given as text (an `EDGE_AGENT__MQTT` value that
# is not JSON, or not a table) is not printed when it looks like this.
_SECRET_WORDS_RE = re.compile(r"password|passwd|token|secret|credential|@", re.IGNORECASE)


def _format_error(err: Mapping[str, Any]) -> str:
    """One operator-facing line from one of pydantic's errors: the key, the value given
    (secrets masked), what is wrong; control characters escaped (a key name may hold any)."""
    return escape_controls(_error_line(err))


def _error_line(err: Mapping[str, Any]) -> str:
    parts = tuple(err.get("loc", ()))
    loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)
    loc = loc.removeprefix(".") or "(top level)"
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(parts[:-1])
        return f"{loc}: unknown key (allowed here: {', '.join(allowed)})"
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    value = err.get("input")
    if isinstance(value, dict):
        return f"{loc}: {msg}"
    if "password" in loc or "token" in loc:
        shown = "***"
    elif parts and parts[-1] == "url" and not isinstance(value, str) and "@" in repr(value):
        shown = "***"  # a list of URLs, say: mask_url takes one string
    elif _is_table(parts) and _SECRET_WORDS_RE.search(repr(value)):
        shown = "***"
    else:
        shown = repr(mask_url(value) if isinstance(value, str) else value)
    return f"{loc} = {shown}: {msg}"


def _is_table(loc: tuple[Any, ...]) -> bool:
    """Whether `loc` names a whole table: a section, the streams, or one stream."""
    if len(loc) == 1:
        return loc[0] in Settings.model_fields and loc[0] != "gateway_id"
    return len(loc) == 2 and loc[0] == "streams" and isinstance(loc[1], int)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys of the table at `loc`."""
    model: Any = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        args = getattr(field.annotation, "__args__", ())
        model = args[0] if args and isinstance(args[0], type) else field.annotation
    return sorted(getattr(model, "model_fields", {}))


def load_settings(path: Path | str | None, *, overrides: dict[str, Any] | None = None) -> Settings:
    """Read TOML at `path` (None: env only) with `overrides` over its top-level keys, apply
    the `EDGE_AGENT__...` variables, validate. Raises ConfigError with every problem."""
    toml = _TomlFile(Settings, str(path) if path is not None else None, overrides or {})
    problems = environment_problems(os.environ)
    if problems:
        raise ConfigError(problems)
    try:
        # The environment first: it wins over the file.
        # (gateway_id comes from the sources; mypy sees only the fields as arguments.)
        settings = Settings(_build_sources=((_Environment(Settings), toml), {}))  # type: ignore[call-arg]
    except ValidationError as e:
        raise ConfigError([_format_error(err) for err in e.errors()]) from None
    for key, f in (
        ("mqtt.password_file", settings.mqtt.password_file),
        ("mqtt.ca_file", settings.mqtt.ca_file),
        ("mqtt.cert_file", settings.mqtt.cert_file),
        ("mqtt.key_file", settings.mqtt.key_file),
        ("forward.token_file", settings.forward.token_file),
        ("forward.ca_file", settings.forward.ca_file),
        ("forward.cert_file", settings.forward.cert_file),
        ("forward.key_file", settings.forward.key_file),
    ):
        if f is None:
            continue
        try:
            found = f.is_file()
        except OSError as e:  # EACCES on a directory on the way, ENAMETOOLONG: is_file raises
            problems.append(f"{key} = {str(f)!r}: cannot be examined: {e.strerror}")
            continue
        if not found:
            problems.append(f"{key} = {str(f)!r}: file not found")
    host_problem = _unresolvable(settings.health.host)
    if host_problem:
        problems.append(f"health.listen = {settings.health.listen!r}: {host_problem}")
    if problems:
        raise ConfigError(problems)
    return settings


def _unresolvable(host: str) -> str | None:
    """Why the health endpoint could not listen on `host`, or None (an IP, or a name that
    resolves now)."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return (
            f"host {host!r} does not resolve; use an IP address (e.g. '127.0.0.1:9108') "
            "or a name the gateway resolves"
        )
    return None


def mask_url(url: str) -> str:
    """The URL with the password of its `user:pass@` part masked ('user:***@'): everything
    from the '://' (or the start, without one) to the URL's last '@', but the user name.
    A password may hold '@', '/', '?', '#' or spaces, so the last '@' ends it (an '@' in the
    path or query masks the host too: over-masking, never a leak)."""
    at = url.rfind("@")
    if at < 0:
        return url
    scheme = url.find("://")
    start = scheme + 3 if 0 <= scheme < at else 0
    user, colon, _ = url[start:at].partition(":")
    return f"{url[:start]}{user}:***{url[at:]}" if colon else f"{url[:start]}***{url[at:]}"


def read_secret(
    inline: SecretStr | None, file: Path | None, credential: str | None = None
) -> str | None:
    """The secret from its inline value, its file (first line), or the systemd credential of
    that name ($CREDENTIALS_DIRECTORY/<credential>, from LoadCredential=); else None."""
    if inline is not None:
        return inline.get_secret_value()
    file = secret_path(file, credential)
    if file is not None:
        # utf-8-sig: a BOM (Windows editors) is not part of the secret.
        lines = file.read_text(encoding="utf-8-sig").splitlines()
        return lines[0].strip() if lines else ""
    return None


# What systemd/edge-agent.service runs: `run --config UNIT_CONFIG`, with each credential loaded
# from UNIT_CREDENTIALS_DIR (LoadCredential=cloud-token:/etc/edge-agent/cloud-token, ...); the
# package and systemd/install.sh create those files. tests/config/test_credentials.py holds
# both to the unit.
UNIT_CONFIG = Path("/etc/edge-agent/config.toml")
UNIT_CREDENTIALS_DIR = Path("/etc/edge-agent")
# Outside systemd, where a command run with the unit's config reads its credentials.
_credentials_outside_systemd: Path | None = None


def credentials_outside_systemd(config: Path | str | None) -> None:
    """Told the config file a command runs with (agent/cli/main.py, once loaded). With the
    unit's own, outside systemd (no $CREDENTIALS_DIRECTORY), the credentials are read from the
    files the unit loads them from, so `check-config --connect`, `run` or `tap` typed by hand
    send what the service sends. Any other config reads only the files it names."""
    global _credentials_outside_systemd
    _credentials_outside_systemd = (
        UNIT_CREDENTIALS_DIR if config is not None and _same_file(config, UNIT_CONFIG) else None
    )


def _same_file(a: Path | str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def credential_path(credential: str) -> Path | None:
    """Where the credential named `credential` comes from when the config names no file:
    $CREDENTIALS_DIRECTORY/<name> under systemd (LoadCredential=), else, run with the unit's
    config, the file the unit loads it from; None when neither applies."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        return Path(directory, credential)
    if _credentials_outside_systemd is not None:
        return _credentials_outside_systemd / credential
    return None


def credential_hint(credential: str, key: str) -> str:
    """What to set when no secret is configured and the credential `credential` gives none:
    for the operator's line (`check-config --connect`); `key` is the config key of its file."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        return f"set {key}, or load the credential {credential} (LoadCredential=)"
    if _credentials_outside_systemd is not None:
        path = _credentials_outside_systemd / credential
        return f"put it in '{path}', which the unit loads, or set {key}"
    return (
        f"set {key}; '{UNIT_CREDENTIALS_DIR / credential}' is the unit's, read with its "
        f"config '{UNIT_CONFIG}'"
    )


def secret_path(file: Path | None, credential: str | None) -> Path | None:
    """The file a secret is read from: the configured one, else its credential's
    (credential_path) when that file is there."""
    if file is None and credential is not None:
        candidate = credential_path(credential)
        if candidate is not None and _present(candidate):
            return candidate
    return file


def _present(path: Path) -> bool:
    try:
        return path.is_file()
    except PermissionError:  # there, not ours to read: reading it says so, naming the file
        return True


def inline_secret_warnings(path: Path | str | None, settings: Settings) -> list[str]:
    """Warnings for a config file that others can read while it holds an inline secret."""
    if path is None:
        return []
    inline = [
        key
        for key, value in (
            ("mqtt.password", settings.mqtt.password),
            ("forward.token", settings.forward.token),
        )
        if value is not None
    ]
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return []
    if inline and mode & 0o004:
        return [
            f"config file {str(path)!r} is readable by every user and holds {', '.join(inline)}; "
            "chmod o-r it, or move the secret to a file (password_file / token_file) or a "
            "systemd credential"
        ]
    return []


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret masked, for `check-config` and logs."""
    doc = settings.model_dump(mode="json")
    doc["forward"]["url"] = mask_url(doc["forward"]["url"])
    return doc
