"""Settings: one frozen, validated object built from a TOML file plus `EDGE_AGENT__...` env vars.

Nothing else in the agent reads the environment or the TOML file; the runner gets a `Settings`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from agent.validate import Invalid, Problem, Rule, SecretStr, Section, build, dotted

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
# The largest size any key takes (a signed 64-bit integer: SQLite's, and what pydantic took).
MAX_SIZE = 2**63 - 1
# MQTT's largest packet (its remaining length is at most 268,435,455 bytes), the most a Maximum
# Packet Size property may say: paho refuses a larger one and `run` died of it.
MQTT_MAX_PACKET_BYTES = 268_435_455
# Room in a PUBLISH packet beyond its payload: fixed header, topic (ids are at most 64
# characters, so a routable topic is short), packet id and properties (user properties too).
PACKET_OVERHEAD_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = MQTT_MAX_PACKET_BYTES - PACKET_OVERHEAD_BYTES


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_size(value: object) -> object:
    """Accept 1048576, "1048576", "64KiB", "1 GiB", "10MB"; leave anything else to the int
    conversion."""
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


def _check_payload_size(size: int) -> None:
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"Input should be less than or equal to {MAX_PAYLOAD_BYTES} (MQTT's largest packet, "
            f"{MQTT_MAX_PACKET_BYTES} bytes, less 64 KiB for the topic and properties)"
        )


ByteSize = Annotated[int, Rule(ge=0, le=MAX_SIZE, before=parse_size)]
Port = Annotated[int, Rule(ge=1, le=65535)]
Positive = Annotated[float, Rule(gt=0)]


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


def _check_host(host: str) -> None:
    # paho refuses '' at connect, getaddrinfo a name of bad labels: `run` died of either.
    if not _resolvable_name(host):
        raise ValueError("expected a host name or IP address, e.g. '127.0.0.1'")


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttSettings(Section):
    host: Annotated[str, Rule(check=_check_host)] = "127.0.0.1"
    port: Port = 1883
    client_id: Annotated[str, Rule(min_length=1, max_length=128)] = "edge-agent"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    session_expiry_s: Annotated[int, Rule(ge=60, le=4294967295)] = 86400
    keepalive_s: Annotated[int, Rule(ge=5, le=3600)] = 30
    connect_timeout_s: Annotated[float, Rule(gt=0, le=300)] = 10.0
    receive_maximum: Annotated[int, Rule(ge=100, le=65535)] = 65535
    max_payload_bytes: Annotated[int, Rule(ge=0, before=parse_size, check=_check_payload_size)] = (
        64 * 1024
    )
    max_fields: Annotated[int, Rule(ge=1, le=100000)] = 256
    max_depth: Annotated[int, Rule(ge=1, le=1000)] = 8
    reconnect_min_s: Positive = 0.5
    reconnect_max_s: Positive = 30.0

    def cross_check(self) -> str | None:
        if self.password is not None and self.password_file is not None:
            return "set either mqtt.password or mqtt.password_file, not both"
        if self.reconnect_max_s < self.reconnect_min_s:
            return "mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s"
        if (self.cert_file is None) != (self.key_file is None):
            return "mqtt.cert_file and mqtt.key_file go together"
        return None


TimeUnit = Literal["auto", "s", "ms", "us", "ns", "rfc3339"]
_TOPIC_LEVEL_RE = re.compile(r"[^+#{}]*")
# MQTT's longest topic (a two-byte length, in UTF-8 bytes).
MQTT_MAX_TOPIC_BYTES = 65535
# What the agent takes as a camera or stream id (agent/ingest.py refuses anything else).
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _check_id(value: str) -> None:
    if not ID_RE.fullmatch(value):
        raise ValueError("an id is 1-64 of A-Z a-z 0-9 . _ -")


def _check_topic(topic: str) -> None:
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


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSettings(Section):
    topic: Annotated[str, Rule(check=_check_topic)]
    name: Annotated[str | None, Rule(check=_check_id)] = None
    time_field: str | None = "ts"
    time_unit: TimeUnit = "auto"
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    max_categories: Annotated[int, Rule(ge=1, le=10000)] = 32

    def cross_check(self) -> str | None:
        has_placeholder = "{stream}" in self.topic.split("/")
        if has_placeholder == (self.name is not None):
            return "give a stream either a '{stream}' level in its topic or a name, one of the two"
        overlap = set(self.numeric) & set(self.categorical)
        if overlap:
            return f"fields both numeric and categorical: {sorted(overlap)}"
        return None

    @property
    def subscription(self) -> str:
        """The MQTT filter that matches this pattern."""
        return "/".join(
            "+" if lv in ("{camera}", "{stream}") else lv for lv in self.topic.split("/")
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregateSettings(Section):
    window_s: Annotated[int, Rule(ge=1, le=3600)] = 1
    allowed_lateness_s: Annotated[float, Rule(ge=0, le=3600)] = 2.0
    idle_close_s: Annotated[float, Rule(gt=0, le=86400)] = 5.0
    late_policy: Literal["delta", "drop"] = "delta"
    max_cameras: Annotated[int, Rule(ge=1)] = 10000
    max_streams_per_camera: Annotated[int, Rule(ge=1)] = 32
    max_open_windows: Annotated[int, Rule(ge=1)] = 200000
    max_skew_s: Positive = 30.0
    skew_policy: Literal["flag", "restamp", "gateway"] = "flag"
    clock_jump_s: Positive = 60.0
    max_future_s: Positive = 300.0
    max_age_s: Positive = 7 * 86400.0
    bad_time_policy: Literal["restamp", "drop"] = "restamp"


@dataclass(frozen=True, slots=True, kw_only=True)
class BufferSettings(Section):
    path: Path = Path("/var/lib/edge-agent/buffer.sqlite3")
    max_bytes: Annotated[int, Rule(ge=1024**2, le=MAX_SIZE, before=parse_size)] = 1024**3
    synchronous: Literal["off", "normal", "full", "extra"] = "full"
    checkpoint_interval_ms: Annotated[int, Rule(ge=10, le=60000)] = 250
    max_ack_delay_ms: Annotated[int, Rule(ge=100, le=3600000)] = 10000
    ack_pressure_ratio: Annotated[float, Rule(gt=0, lt=1)] = 0.6
    overflow: Literal["drop_oldest", "backpressure"] = "backpressure"


_URL_PORT_PROBLEM = "expected an http(s) URL with a port from 1 to 65535"


def _check_url(url: str) -> None:
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


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardSettings(Section):
    url: Annotated[str, Rule(check=_check_url)] = "http://127.0.0.1:8080/ingest"
    token: SecretStr | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_s: Annotated[float, Rule(gt=0, le=600)] = 10.0
    max_batch_chunks: Annotated[int, Rule(ge=1, le=100000)] = 500
    max_batch_bytes: ByteSize = 1024**2
    linger_ms: Annotated[int, Rule(ge=0, le=60000)] = 200
    gzip: bool = True
    backoff_min_s: Positive = 0.5
    backoff_max_s: Positive = 60.0
    shutdown_drain_s: Annotated[float, Rule(ge=0, le=600)] = 5.0
    max_chunks_per_s: Positive = 50000.0
    max_bytes_per_s: ByteSize = 0
    min_chunks_per_s: Positive = 50.0
    fast_response_s: Positive = 1.0
    # The cloud unreachable this long, or the oldest unsent chunk this old, is a problem in
    # /readyz, /status and `edge-agent status` (exit 1): an outage you can alert on.
    alert_after_s: Annotated[float, Rule(ge=1, le=30 * 86400)] = 300.0

    def cross_check(self) -> str | None:
        if self.token is not None and self.token_file is not None:
            return "set either forward.token or forward.token_file, not both"
        if self.backoff_max_s < self.backoff_min_s:
            return "forward.backoff_max_s must be >= forward.backoff_min_s"
        if self.min_chunks_per_s > self.max_chunks_per_s:
            return "forward.min_chunks_per_s must be <= forward.max_chunks_per_s"
        return None


def _check_listen(listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("expected HOST:PORT, e.g. '127.0.0.1:9108'")
    if not 1 <= int(port) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535, e.g. '127.0.0.1:9108'")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthSettings(Section):
    listen: Annotated[str, Rule(check=_check_listen)] = "127.0.0.1:9108"

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


def _default_streams() -> tuple[StreamSettings, ...]:
    return (
        StreamSettings(
            topic="site/cam/{camera}/{stream}",
            numeric=("conf", "level", "temp_c", "fps"),
            categorical=("cls", "zone", "status"),
        ),
    )


def _check_gateway_id(gateway_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", gateway_id):
        raise ValueError("use letters, digits, '.', '_' and '-' only")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings(Section):
    gateway_id: Annotated[str, Rule(min_length=1, max_length=128, check=_check_gateway_id)]
    mqtt: MqttSettings = MqttSettings()
    streams: Annotated[tuple[StreamSettings, ...], Rule(min_length=1)] = field(
        default_factory=_default_streams
    )
    aggregate: AggregateSettings = AggregateSettings()
    buffer: BufferSettings = BufferSettings()
    forward: ForwardSettings = ForwardSettings()
    health: HealthSettings = HealthSettings()
    log: LogSettings = LogSettings()

    def cross_check(self) -> str | None:
        names: set[tuple[str, str | None]] = set()
        for s in self.streams:
            key = (s.subscription, s.name)
            if key in names:
                return f"two [[streams]] entries have the same topic {s.topic!r}"
            names.add(key)
        filters = sorted({s.subscription for s in self.streams})
        for i, a in enumerate(filters):
            for b in filters[i + 1 :]:
                if _overlap(a, b):
                    return (
                        f"two [[streams]] topics can match the same topic ({a!r} and {b!r}): "
                        "the broker would deliver such a message once per subscription and "
                        "it would be counted twice; make them disjoint"
                    )
        return None


def _overlap(a: str, b: str) -> bool:
    """Whether two MQTT filters of '+' and literal levels can match one topic."""
    la, lb = a.split("/"), b.split("/")
    return len(la) == len(lb) and all(x == y or "+" in (x, y) for x, y in zip(la, lb, strict=True))


def _format_problem(problem: Problem) -> str:
    """One operator-facing line: the key, the value given (secrets masked), what is wrong."""
    loc = dotted(problem.loc)
    value = problem.value
    if problem.kind != "invalid" or isinstance(value, dict):
        return f"{loc}: {problem.message}"
    if "password" in loc or "token" in loc:
        shown = "***"
    else:
        shown = repr(mask_url(value) if isinstance(value, str) else value)
    return f"{loc} = {shown}: {problem.message}"


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`EDGE_AGENT__SECTION__KEY=value` variables as nested keys (names case-insensitive); a
    value that starts with `[` or `{` is JSON (e.g. `EDGE_AGENT__STREAMS='[{"topic": ...}]'`).
    Plain values stay text: the validation parses them like the TOML's. Two variables for one
    key, or one inside a key another sets whole, raise ConfigError naming both."""
    out: dict[str, Any] = {}
    source: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    prefix = ENV_PREFIX.lower()
    for name, value in sorted(environ.items()):
        lowered = name.lower()
        if not lowered.startswith(prefix):
            continue
        path = lowered[len(prefix) :].split("__")
        if not all(path):
            continue
        parsed: Any = value
        if value.lstrip()[:1] in ("[", "{"):
            # Not JSON: left as text, and the validation names the key and what it expected.
            try:
                parsed = json.loads(value)
            except ValueError:
                pass
            except RecursionError:
                problems.append(f"{name}: the JSON is nested too deeply")
                continue
        clash = next(
            (source[tuple(path[:i])] for i in range(1, len(path) + 1) if tuple(path[:i]) in source),
            None,
        ) or next((n for p, n in source.items() if p[: len(path)] == tuple(path)), None)
        if clash is not None:
            problems.append(
                f"{name} and {clash} both set {'.'.join(path[: min(len(path), 2)])}: "
                "keep one (names are case-insensitive; a list or table is set whole, as JSON)"
            )
            continue
        source[tuple(path)] = name
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = parsed
    if problems:
        raise ConfigError(problems)
    return out


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, tables merged key by key."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merged(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(path: Path | str | None, *, overrides: dict[str, Any] | None = None) -> Settings:
    """Read TOML at `path` (None: env only), apply env overrides, validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"config file {str(p)!r} not found"]) from None
        except OSError as e:
            raise ConfigError([f"config file {str(p)!r} cannot be read: {e.strerror}"]) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"config file {str(p)!r} is not valid TOML: {e}"]) from None
        except RecursionError:  # tomllib recurses per nested array or inline table
            deep = f"config file {str(p)!r} is not valid TOML: nested too deeply"
            raise ConfigError([deep]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"config file {str(p)!r} is not UTF-8 text"]) from None
    if overrides:
        data = {**data, **overrides}
    # Environment first: an `EDGE_AGENT__SECTION__KEY` variable overrides the TOML file.
    data = _merged(data, env_overrides(os.environ))
    try:
        settings = build(Settings, data)
    except Invalid as e:
        raise ConfigError([_format_problem(p) for p in e.problems]) from None
    problems = []
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
        if f is not None and not f.is_file():
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


_URL_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@\s]*)@")


def mask_url(url: str) -> str:
    """The URL with the password of its `user:pass@` part masked ('user:***@')."""

    def masked(m: re.Match[str]) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if colon else f"{m.group(1)}***@"

    return _URL_USERINFO_RE.sub(masked, url, count=1)


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


def secret_path(file: Path | None, credential: str | None) -> Path | None:
    """The file a secret is read from: the configured one, else the systemd credential."""
    if file is None and credential is not None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        candidate = Path(directory, credential) if directory else None
        if candidate is not None and candidate.is_file():
            return candidate
    return file


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
    doc = settings.dump()
    doc["forward"]["url"] = mask_url(doc["forward"]["url"])
    return doc
