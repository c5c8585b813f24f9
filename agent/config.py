"""Settings: one frozen, validated object built from a TOML file plus `EDGE_AGENT__...` env vars.

Nothing else in the agent reads the environment or the TOML file; the runner gets a `Settings`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_size(value: object) -> object:
    """Accept 1048576, "1048576", "64KiB", "1 GiB", "10MB"; leave anything else to pydantic."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, '64KiB' or '1GiB'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(
                "expected a size such as 1048576, '64KiB' or '1GiB' "
                "(units: B, KB, MB, GB, KiB, MiB, GiB, TiB)"
            )
        return int(float(m.group(1)) * _SIZE_UNITS[unit or ""])
    return value


ByteSize = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: object, info: ValidationInfo) -> object:
        # pydantic's lax mode reads `port = true` as 1.
        name = info.field_name
        if isinstance(v, bool) and name and cls.model_fields[name].annotation in (int, float):
            raise ValueError("expected a number, not true/false")
        return v


class MqttSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str = Field(default="edge-agent", min_length=1, max_length=128)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    session_expiry_s: int = Field(default=86400, ge=60, le=4294967295)
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    receive_maximum: int = Field(default=65535, ge=100, le=65535)
    max_payload_bytes: ByteSize = 64 * 1024
    max_fields: int = Field(default=256, ge=1, le=100000)
    max_depth: int = Field(default=8, ge=1, le=1000)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> MqttSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either mqtt.password or mqtt.password_file, not both")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mqtt.cert_file and mqtt.key_file go together")
        return self


TimeUnit = Literal["auto", "s", "ms", "us", "ns", "rfc3339"]
_TOPIC_LEVEL_RE = re.compile(r"^[^+#{}]*$")


class StreamSettings(Section):
    topic: str
    name: str | None = None
    time_field: str | None = "ts"
    time_unit: TimeUnit = "auto"
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    max_categories: int = Field(default=32, ge=1, le=10000)

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        levels = v.split("/")
        if "{camera}" not in levels:
            raise ValueError(
                "the topic needs a whole level '{camera}', e.g. 'site/cam/{camera}/det'"
            )
        for level in levels:
            if level in ("{camera}", "{stream}"):
                continue
            if not level or not _TOPIC_LEVEL_RE.match(level):
                raise ValueError(
                    "topic levels are literal names or exactly '{camera}' / '{stream}' "
                    "(no '+', '#', empty levels or partial placeholders)"
                )
        if levels.count("{camera}") > 1 or levels.count("{stream}") > 1:
            raise ValueError("'{camera}' and '{stream}' may appear once each")
        return v

    @model_validator(mode="after")
    def _name(self) -> StreamSettings:
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


class AggregateSettings(Section):
    window_s: int = Field(default=1, ge=1, le=3600)
    allowed_lateness_s: float = Field(default=2.0, ge=0, le=3600)
    idle_close_s: float = Field(default=5.0, gt=0, le=86400)
    late_policy: Literal["delta", "drop"] = "delta"
    max_cameras: int = Field(default=10000, ge=1)
    max_streams_per_camera: int = Field(default=32, ge=1)
    max_open_windows: int = Field(default=200000, ge=1)
    max_skew_s: float = Field(default=30.0, gt=0)
    skew_policy: Literal["flag", "restamp", "gateway"] = "flag"
    clock_jump_s: float = Field(default=60.0, gt=0)
    max_future_s: float = Field(default=300.0, gt=0)
    max_age_s: float = Field(default=7 * 86400.0, gt=0)
    bad_time_policy: Literal["restamp", "drop"] = "restamp"


class BufferSettings(Section):
    path: Path = Path("/var/lib/edge-agent/buffer.sqlite3")
    max_bytes: Annotated[int, BeforeValidator(parse_size), Field(ge=1024**2)] = 1024**3
    synchronous: Literal["off", "normal", "full", "extra"] = "full"
    checkpoint_interval_ms: int = Field(default=250, ge=10, le=60000)
    max_ack_delay_ms: int = Field(default=10000, ge=100, le=3600000)
    ack_pressure_ratio: float = Field(default=0.6, gt=0, lt=1)
    overflow: Literal["drop_oldest", "backpressure"] = "backpressure"


class ForwardSettings(Section):
    url: str = "http://127.0.0.1:8080/ingest"
    token: SecretStr | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    max_batch_chunks: int = Field(default=500, ge=1, le=100000)
    max_batch_bytes: ByteSize = 1024**2
    linger_ms: int = Field(default=200, ge=0, le=60000)
    gzip: bool = True
    backoff_min_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    shutdown_drain_s: float = Field(default=5.0, ge=0, le=600)
    max_chunks_per_s: float = Field(default=50000.0, gt=0)
    max_bytes_per_s: ByteSize = 0
    min_chunks_per_s: float = Field(default=50.0, gt=0)
    fast_response_s: float = Field(default=1.0, gt=0)
    # The cloud unreachable this long, or the oldest unsent chunk this old, is a problem in
    # /readyz, /status and `edge-agent status` (exit 1): an outage you can alert on.
    alert_after_s: float = Field(default=300.0, ge=1, le=30 * 86400)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError("expected an http:// or https:// URL")
        try:
            parts = urlsplit(v)
            port = parts.port
        except ValueError:  # a port out of 0..65535, not a number, or a broken [IPv6] host
            raise ValueError("expected an http(s) URL with a port from 1 to 65535") from None
        if port == 0:
            raise ValueError("expected an http(s) URL with a port from 1 to 65535")
        if not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host")
        return v

    @model_validator(mode="after")
    def _check(self) -> ForwardSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set either forward.token or forward.token_file, not both")
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("forward.backoff_max_s must be >= forward.backoff_min_s")
        if self.min_chunks_per_s > self.max_chunks_per_s:
            raise ValueError("forward.min_chunks_per_s must be <= forward.max_chunks_per_s")
        return self


class HealthSettings(Section):
    listen: str = "127.0.0.1:9108"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("expected HOST:PORT, e.g. '127.0.0.1:9108'")
        if not 1 <= int(port) <= 65535:
            raise ValueError("the port must be a number from 1 to 65535, e.g. '127.0.0.1:9108'")
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")


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


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gateway_id: str = Field(min_length=1, max_length=128)
    mqtt: MqttSettings = MqttSettings()
    streams: tuple[StreamSettings, ...] = Field(default_factory=_default_streams, min_length=1)
    aggregate: AggregateSettings = AggregateSettings()
    buffer: BufferSettings = BufferSettings()
    forward: ForwardSettings = ForwardSettings()
    health: HealthSettings = HealthSettings()
    log: LogSettings = LogSettings()

    @field_validator("gateway_id")
    @classmethod
    def _gateway_id(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9._-]+$", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return v

    @model_validator(mode="after")
    def _cross(self) -> Settings:
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


def _format_error(err: Any) -> str:
    loc_parts: list[str] = []
    for part in err.get("loc", ()):
        if isinstance(part, int):
            loc_parts[-1:] = [f"{loc_parts[-1]}[{part}]"] if loc_parts else [f"[{part}]"]
        else:
            loc_parts.append(str(part))
    loc = ".".join(loc_parts) or "(top level)"
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(err.get("loc", ())[:-1])
        return f"{loc}: unknown key (allowed here: {', '.join(allowed)})"
    if kind == "missing":
        return f"{loc}: required key is missing"
    value = err.get("input")
    if "password" in loc or "token" in loc:
        shown = "***"
    else:
        shown = repr(mask_url(value) if isinstance(value, str) else value)
    if isinstance(value, dict):
        return f"{loc}: {msg}"
    return f"{loc} = {shown}: {msg}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = args[0] if args and isinstance(args[0], type) else ann
    return sorted(getattr(model, "model_fields", {}))


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
            with contextlib.suppress(ValueError):
                parsed = json.loads(value)
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
        except UnicodeDecodeError:
            raise ConfigError([f"config file {str(p)!r} is not UTF-8 text"]) from None
    if overrides:
        data = {**data, **overrides}
    # Environment first: an `EDGE_AGENT__SECTION__KEY` variable overrides the TOML file.
    data = _merged(data, env_overrides(os.environ))
    try:
        settings = Settings(**data)
    except ValidationError as e:
        errors = e.errors()
        locs = [tuple(err.get("loc", ())) for err in errors]
        # A container's error that only echoes a failure inside it adds nothing.
        kept = [
            err
            for err, loc in zip(errors, locs, strict=True)
            if not any(len(o) > len(loc) and o[: len(loc)] == loc for o in locs)
        ]
        raise ConfigError([_format_error(err) for err in kept]) from None
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
    doc = settings.model_dump(mode="json")
    doc["forward"]["url"] = mask_url(doc["forward"]["url"])
    return doc
