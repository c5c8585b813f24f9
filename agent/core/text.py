"""Text for people: times in RFC 3339 (UTC), durations in words, a foreign text as one safe line.
The one place these are written; /status, the logs, the CLI and the wire format use them."""

from __future__ import annotations

import time


def rfc3339(t: float) -> str:
    """UTC, second precision: '2026-11-26T15:35:09Z'."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def rfc3339_ms(t: float) -> str:
    """UTC, millisecond precision (truncated): '2026-11-26T15:35:09.123Z'. A batch's sent_at
    is written with it: the same bytes on every retry and restart (G7), so never change it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def duration_words(seconds: float) -> str:
    """'45 s', '27 min', '3.5 h', '2.0 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def one_line(text: str, limit: int = 200) -> str:
    """A foreign text (the cloud's words, an exception) as one printable line of at most `limit`
    characters: newlines and control characters escaped, so it cannot forge log lines."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        for ch in text[:limit]
    )
