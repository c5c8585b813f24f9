"""Log lines on stdout: plain text, journald (priority prefixes, no own timestamp) or JSON.

Under systemd, stdout goes to the journal, which stamps each line itself and reads a `<N>`
syslog priority prefix, so `journalctl -p warning` works; the agent knows it is there when
JOURNAL_STREAM names its stdout. JSON lines carry an RFC 3339 time and the message's fields.
Topics arrive as bytes from MQTT; they are printed as text, never as b'...' reprs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import IO, Any

from agent.config.settings import LogSettings
from agent.core.text import rfc3339_ms

# syslog priorities (RFC 5424) of the logging levels.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
# Attributes every LogRecord has; anything else was passed with `extra=` and is a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels in between take the next lower one)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def _text(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    return value


class TextArgs(logging.Filter):
    """Bytes arguments (MQTT topics) become text before the message is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_text(a) for a in record.args)
        return True


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`, the prefix on every line (a traceback keeps its priority)."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, msg, and the fields: the
    message's arguments (`args`) and anything passed with `extra=`."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": rfc3339_ms(record.created),
            "level": record.levelname.lower(),
            "priority": priority(record.levelno),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if isinstance(record.args, tuple) and record.args:
            doc["args"] = list(record.args)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = _text(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def under_journald(stream: IO[str], env: dict[str, str] | None = None) -> bool:
    """True when JOURNAL_STREAM names this stream's device and inode (systemd sets it for the
    service's stdout; a child whose stdout was redirected elsewhere must not believe it)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(s: LogSettings, stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    handler = logging.StreamHandler(stream)
    if s.format == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(TextArgs())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(s.level.upper())
    # paho logs every packet at debug; keep it at warning unless asked.
    logging.getLogger("mqtt").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpx").setLevel(logging.WARNING)
