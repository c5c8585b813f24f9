"""Every exception the agent raises on purpose, in one small tree (as httpx keeps its own):
what a caller may catch, and what the CLI alone turns into an exit code (agent/cli/main.py).

    AgentError
    ├── ConfigError          the configuration is unusable             exit 2
    ├── StartupError         the agent cannot start                    exit 3
    │   ├── AlreadyRunning   another agent holds the outbox
    │   └── TapError         `tap`: the broker unreachable or refusing
    ├── OutboxError          the outbox cannot be opened or written    exit 3 at start
    ├── IncompatibleClient   aiomqtt's internals changed (a bug report, not an exit code)
    └── DataError            a value from outside cannot be used: counted, never raised out
        ├── BadTimestamp     a message's timestamp is no time in the configured unit
        ├── BadChunk         a stored chunk is not a well-formed chunk
        └── BadBatch         a batch body is not the wire format (edge-ingest answers 400)

A second signal during the shutdown is `agent.app.service.SecondSignal`, a SystemExit (asyncio
lets only those through), mapped to its exit code by the CLI too.
"""

from __future__ import annotations

from pathlib import Path


class AgentError(Exception):
    """The base of every exception the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration is unusable; `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class StartupError(AgentError):
    """The agent cannot start (a port in use, an unreadable state file...): exit 3, one line."""


class AlreadyRunning(StartupError):
    """Another process holds the outbox lock."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"another edge-agent holds {path} ({who})")
        self.path = path
        self.pid = pid


class TapError(StartupError):
    """The broker could not be reached, refused us, or refused a subscription."""


class OutboxError(AgentError):
    """The outbox cannot be opened or written (not corruption: the file is left alone). The
    only error the outbox lets out (agent/durable/outbox.py turns SQLite's into it); `full`:
    the disk or the quota is full (backpressure, not a fault)."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


class IncompatibleClient(AgentError, RuntimeError):
    """aiomqtt's internals changed; manual acks cannot be guaranteed."""


class DataError(AgentError, ValueError):
    """A value from outside (a payload, a stored row) that cannot be used."""


class BadTimestamp(DataError):
    """The timestamp field is present but is not a time in the configured unit."""


class BadChunk(DataError):
    """A stored chunk body that is not a well-formed chunk with finite numbers."""


class BadBatch(DataError):
    """A batch body that is not the wire format: the message names what is wrong and where."""
