"""edge-ingest's configuration: a TOML file, `EDGE_INGEST__KEY` variables over it, command-line
flags over both; validated by pydantic-settings like the agent's. A bad value fails at start
with one line naming the key, the value and what is allowed."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.config.settings import parse_size

ENV_PREFIX = "EDGE_INGEST__"
Size = Annotated[int, BeforeValidator(parse_size), Field(ge=1024, le=1024**3)]


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", frozen=True, title="edge-ingest")

    dsn: SecretStr = Field(
        description="libpq URL of the database, e.g. postgresql://ingest@db:5432/metrics"
    )
    listen: str = Field(default="127.0.0.1:8080", description="HOST:PORT to serve HTTP on")
    pool: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Database connections of this replica, whatever "
        "the number of gateways (C3): N replicas use N x pool.",
    )
    token_file: Path | None = Field(
        default=None, description="File with the accepted bearer tokens, one per line"
    )
    no_auth: bool = Field(
        default=False, description="Accept batches without a token (a lab only; logged)"
    )
    max_body_bytes: Size = Field(default=8 * 1024**2, description="Largest request body (413)")
    max_decompressed_bytes: Size = Field(
        default=64 * 1024**2, description="Largest body once gunzipped (413)"
    )
    statement_timeout_ms: int = Field(default=15_000, ge=100, le=600_000)
    lock_timeout_ms: int = Field(default=5_000, ge=10, le=600_000)
    acquire_timeout_ms: int = Field(
        default=2_000, ge=10, le=60_000, description="Wait for a pooled connection; then 503"
    )
    max_waiting: int = Field(
        default=64,
        ge=0,
        le=100_000,
        description="Requests waiting for a connection beyond which new ones get 503 at once",
    )
    retry_after_s: int = Field(default=2, ge=1, le=3600, description="Retry-After of a 503")
    max_batch_rows: int = Field(
        default=200_000,
        ge=1_000,
        le=10_000_000,
        description="Rows one batch may make (413: the agent splits it)",
    )
    max_connections: int = Field(
        default=1024,
        ge=16,
        le=100_000,
        description="Open HTTP connections beyond which new ones get 503 (slow clients)",
    )
    body_timeout_s: int = Field(
        default=30, ge=1, le=3600, description="Reading one request's body; then 408"
    )
    rollup: bool = Field(
        default=True, description="Keep the per-minute rollup in the ingest transaction"
    )
    retention_days: int = Field(default=30, ge=1, le=36_500)
    partitions_ahead_days: int = Field(default=7, ge=1, le=365)
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT with a port 1-65535")
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def tokens(self) -> dict[str, tuple[str, ...]]:
        """The accepted tokens, each with the gateway ids it may send for (fnmatch patterns;
        none: any gateway). One per line: `TOKEN [GATEWAY ...]`; `#` starts a comment. Read
        at start: a rotated file needs a restart."""
        text = self.token_file.read_text(encoding="utf-8-sig") if self.token_file else ""
        out: dict[str, tuple[str, ...]] = {}
        for line in text.splitlines():
            words = line.split()
            if words and not words[0].startswith("#"):
                out[words[0]] = tuple(words[1:])
        return out


def _env(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in environ.items():
        if k.startswith(ENV_PREFIX):
            out[k.removeprefix(ENV_PREFIX).lower()] = v
    return out


def load(path: Path | None, overrides: dict[str, Any]) -> IngestSettings:
    """The file at `path` (if any), then EDGE_INGEST__ variables, then `overrides` (flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except OSError as e:
            raise ConfigError([f"config file {str(path)!r} cannot be read: {e.strerror}"]) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError([f"config file {str(path)!r} is not valid TOML: {e}"]) from None
    values.update(_env(dict(os.environ)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        s = IngestSettings(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(IngestSettings.model_fields))
                problems.append(f"{key}: unknown key (allowed: {allowed})")
            elif err["type"] == "missing":
                problems.append(f"{key}: required (--{key} or {ENV_PREFIX}{key.upper()})")
            else:
                shown = "***" if key in ("dsn",) else repr(err.get("input"))
                msg = str(err["msg"]).removeprefix("Value error, ")
                problems.append(f"{key} = {shown}: {msg}")
        raise ConfigError(problems) from None
    problems = []
    if s.token_file is not None:
        try:
            if not s.tokens():
                problems.append(f"token_file = {str(s.token_file)!r}: holds no token")
        except OSError as e:
            problems.append(f"token_file = {str(s.token_file)!r}: cannot be read: {e.strerror}")
    elif not s.no_auth:
        problems.append("token_file: required (or no_auth = true for a lab without tokens)")
    if problems:
        raise ConfigError(problems)
    return s
