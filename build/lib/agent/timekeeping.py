"""Event time: parse a payload's timestamp into epoch seconds (float, UTC)."""

from __future__ import annotations

import math
from datetime import datetime

# Epoch magnitudes for `auto`: seconds reach 1e10 in the year 2286; a ms value for any date after
# 1973 exceeds 1e11, a µs value exceeds 1e14, a ns value exceeds 1e17.
_AUTO_DIVISORS = ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3))
_UNIT_DIVISORS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


class BadTimestamp(ValueError):
    """The timestamp field is present but is not a time in the configured unit."""


def epoch_auto(value: float) -> float:
    """Tell s / ms / µs / ns apart by magnitude and return seconds."""
    a = abs(value)
    for threshold, divisor in _AUTO_DIVISORS:
        if a >= threshold:
            return value / divisor
    return value


def parse_event_time(value: object, unit: str) -> float:
    """Epoch seconds from a payload value; raises BadTimestamp when it is not one."""
    if unit == "rfc3339" or (unit == "auto" and isinstance(value, str)):
        if not isinstance(value, str):
            raise BadTimestamp("expected an RFC 3339 string")
        return _rfc3339(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadTimestamp("expected a number")
    f = float(value)
    if not math.isfinite(f):
        raise BadTimestamp("not finite")
    seconds = epoch_auto(f) if unit == "auto" else f / _UNIT_DIVISORS[unit]
    if not 0 <= seconds < 1e10:
        raise BadTimestamp("outside 1970..2286")
    return seconds


def _rfc3339(text: str) -> float:
    if len(text) > 40:
        raise BadTimestamp("string too long for a timestamp")
    try:
        dt = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise BadTimestamp("not an RFC 3339 timestamp") from None
    if dt.tzinfo is None:
        raise BadTimestamp("RFC 3339 timestamp without a zone offset")
    return dt.timestamp()
