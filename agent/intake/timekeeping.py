"""Event time: parse a payload's timestamp into epoch seconds (float, UTC)."""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from agent.core.errors import BadTimestamp

# Epoch magnitudes for `auto`: seconds reach 1e10 in the year 2286; a ms value for any date after
# 1973 exceeds 1e11, a µs value exceeds 1e14, a ns value exceeds 1e17.
_AUTO_DIVISORS = ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3))
_UNIT_DIVISORS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def epoch_auto(value: float) -> float:
    """Tell s / ms / µs / ns apart by magnitude and return seconds."""
    a = abs(value)
    for threshold, divisor in _AUTO_DIVISORS:
        if a >= threshold:
            return value / divisor
    return value


def unit_of(value: object, unit: str) -> str:
    """The unit `parse_event_time` reads `value` in: `unit` itself, or for "auto" the one told
    by magnitude ("s", "ms", "us", "ns") or "rfc3339" for a string (for `edge-agent tap`)."""
    if unit != "auto":
        return unit
    if isinstance(value, str):
        return "rfc3339"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "auto"
    try:
        a = abs(float(value))
    except OverflowError:  # an int of 309+ digits: no time in any unit
        return "auto"
    for threshold, divisor in _AUTO_DIVISORS:
        if a >= threshold:
            return next(name for name, d in _UNIT_DIVISORS.items() if d == divisor)
    return "s"


def parse_event_time(value: object, unit: str) -> float:
    """Epoch seconds from a payload value; raises BadTimestamp when it is not one."""
    if unit == "rfc3339" or (unit == "auto" and isinstance(value, str)):
        if not isinstance(value, str):
            raise BadTimestamp("expected an RFC 3339 string")
        return _rfc3339(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadTimestamp("expected a number")
    try:
        f = float(value)
    except OverflowError:  # an int literal of 309+ digits
        raise BadTimestamp("too large") from None
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


# -- per-camera clocks --------------------------------------------------------------------------

SkewPolicy = Literal["flag", "restamp", "gateway"]
BadTimePolicy = Literal["restamp", "drop"]


@dataclass(frozen=True, slots=True)
class ClockPolicy:
    """What to do about cameras whose clocks are off (see [aggregate] in the config)."""

    skew_policy: SkewPolicy = "flag"
    max_skew_s: float = 30.0
    max_future_s: float = 300.0
    max_age_s: float = 7 * 86400.0
    bad_time_policy: BadTimePolicy = "restamp"
    jump_s: float = 60.0


class CameraClock:
    """A robust running estimate of one camera's clock offset.

    d = receive time - event time is the true offset plus network and queueing delay, and
    delay only adds, so the offset estimate is the minimum of d over the last WINDOW samples
    (late or buffered messages do not move it), and its spread the median minus that minimum.
    A sample more than jump_s away from the estimate is a deviant; three consistent deviants in
    a row are a step of the camera clock (reset to 1970, a jump of hours, a unit switch): the
    estimate moves to the new level at once.
    """

    WINDOW = 64
    CONFIRM = 3

    __slots__ = ("_candidates", "_window", "jumps", "offset", "samples", "suspect")

    def __init__(self) -> None:
        self._window: deque[float] = deque(maxlen=self.WINDOW)
        self._candidates: list[float] = []
        self.offset: float | None = None
        self.samples = 0
        self.jumps = 0
        self.suspect = False

    @property
    def spread(self) -> float:
        """Median minus minimum of the window: how much delay varies (for /status)."""
        if not self._window:
            return 0.0
        w = sorted(self._window)
        return w[len(w) // 2] - w[0]

    @property
    def skew_s(self) -> float | None:
        """Event time minus true time: negative when the camera clock is behind."""
        return None if self.offset is None else -self.offset

    def shift(self, step: float) -> None:
        """The gateway's wall clock stepped by `step`: every sample (receive - event time) moves
        by it; the camera did not change."""
        self._window = deque((x + step for x in self._window), maxlen=self.WINDOW)
        self._candidates = [x + step for x in self._candidates]
        if self.offset is not None:
            self.offset += step

    def observe(self, d: float, jump_s: float) -> bool:
        """Add one sample; returns True when it deviates from the estimate (a possible step)."""
        self.samples += 1
        if self.offset is not None and len(self._window) >= 8 and abs(d - self.offset) > jump_s:
            c = self._candidates
            c.append(d)
            if len(c) >= self.CONFIRM and max(c) - min(c) <= jump_s / 4:
                self._window.clear()
                self._window.extend(c)
                c.clear()
                self.jumps += 1
                self.offset = min(self._window)
            return True
        self._candidates.clear()
        w = self._window
        evicted = w[0] if len(w) == w.maxlen else None
        w.append(d)
        # The windowed minimum, kept incrementally: a full scan only when the minimum leaves.
        if self.offset is None or d <= self.offset:
            self.offset = d
        elif evicted is not None and evicted <= self.offset:
            self.offset = min(w)
        return False


class CameraClocks:
    """Every camera's clock, and the policy that turns (event time, receive time) into the time
    a message is aggregated under, with the flags its chunk carries. Pure: times passed in.

    The gateway's clock can be the wrong one: an RTC without a battery comes back in 2000 after
    a power cut, an NTP server is wrong for a while. When at least CONSENSUS_MIN cameras have an
    estimate and most of them agree with each other (within max_skew_s of their median) but
    that median is off by more than max_skew_s, the cameras are right and the gateway is not:
    `gateway_offset` (gateway minus the cameras) corrects every receive time, cameras are judged
    against the corrected time, and nothing is restamped on the gateway's word. A step of the
    gateway clock that the monotonic clock proves moves every estimate by the step instead of
    starting them over, so a step never looks like every camera's fault.
    """

    MAX_CAMERAS = 100_000
    CONSENSUS_MIN = 3
    # No clock reading before this is right (2024-01-01, before this software): cameras that
    # all came back in 1970 after the site's power cut agree with each other, and must not
    # outvote a gateway that is right; a gateway back in 2000 is outvoted by cameras in 2026.
    PLAUSIBLE_AFTER = 1_704_067_200.0
    # The consensus is worked out again at most this often (seconds of receive time), and at
    # each of the first cameras' first sample, so that a wrong clock at start is seen at once.
    CONSENSUS_EVERY_S = 1.0

    def __init__(self, policy: ClockPolicy) -> None:
        self.policy = policy
        self._clocks: dict[str, CameraClock] = {}
        self.counters: Counter[str] = Counter()
        # (camera, what happened) notices for the caller to log, drained by take_notices().
        self.notices: list[str] = []
        # The gateway's wall clock minus the cameras' consensus (0.0: the gateway is trusted),
        # and how many cameras agreed / had an estimate when it was worked out.
        self.gateway_offset = 0.0
        self.consensus = (0, 0)
        self._consensus_at: float | None = None
        # The offset last announced in a notice (a step moves gateway_offset at once; the
        # consensus then says whether that is news).
        self._announced = 0.0
        # A step of the gateway clock was seen (the monotonic clock proved it): from then on
        # one camera suffices to say which side of it is right, and when none can, the step's
        # offset stands (a step the agent sees moves nothing).
        self._stepped = False

    @property
    def gateway_trusted(self) -> bool:
        return self.gateway_offset == 0.0

    def _update_consensus(self, recv_t: float, new_camera: bool) -> None:
        due = self._consensus_at is None or abs(recv_t - self._consensus_at) >= (
            self.CONSENSUS_EVERY_S
        )
        if not due and not (new_camera and len(self._clocks) <= 4 * self.CONSENSUS_MIN):
            return
        self._consensus_at = recv_t
        p = self.policy
        offsets = sorted(c.offset for c in self._clocks.values() if c.offset is not None)
        median = offsets[len(offsets) // 2] if offsets else 0.0
        agree = sum(1 for o in offsets if abs(o - median) <= p.max_skew_s)
        self.consensus = (agree, len(offsets))
        needed = 1 if self._stepped else self.CONSENSUS_MIN
        decided = len(offsets) >= needed and 2 * agree > len(offsets)
        # The cameras' time as the consensus has it (recv_t - median): before PLAUSIBLE_AFTER
        # it is the cameras that are wrong, whatever their number.
        decided = decided and recv_t - median >= self.PLAUSIBLE_AFTER
        if decided:
            offset = median if abs(median) > p.max_skew_s else 0.0
        elif self._stepped and recv_t - self.gateway_offset >= self.PLAUSIBLE_AFTER:
            offset = self.gateway_offset  # no camera can say: the proven step stands
        else:
            offset = 0.0
        if (offset == 0.0) != (self._announced == 0.0) or (
            offset and abs(offset - self._announced) > p.max_skew_s
        ):
            self._announced = offset
            self.notices.append(
                f"gateway clock off by {offset:+.1f} s against the cameras ({agree} of "
                f"{len(offsets)} agree): camera times kept, receive times corrected; fix the "
                "gateway's time (NTP, RTC)"
                if offset
                else f"gateway clock agrees with the cameras again ({agree} of {len(offsets)})"
            )
            self.counters["gateway_clock_distrusted" if offset else "gateway_clock_trusted"] += 1
        self.gateway_offset = offset

    def get(self, camera: str) -> CameraClock | None:
        return self._clocks.get(camera)

    def items(self) -> list[tuple[str, CameraClock]]:
        return list(self._clocks.items())

    def forget(self, camera: str) -> None:
        self._clocks.pop(camera, None)

    def stamp(
        self, camera: str, event_t: float, recv_t: float
    ) -> tuple[float, tuple[str, ...]] | None:
        """The time to aggregate under and the chunk flags; None: drop the message (counted)."""
        p = self.policy
        clock = self._clocks.get(camera)
        new_camera = clock is None
        if clock is None:
            if len(self._clocks) >= self.MAX_CAMERAS:
                self._clocks.clear()
            clock = self._clocks[camera] = CameraClock()
        d = recv_t - event_t
        jumps = clock.jumps
        deviant = clock.observe(d, p.jump_s)
        if clock.jumps != jumps:
            self.counters["clock_jumps"] += 1
            self.notices.append(
                f"camera {camera}: clock stepped; skew now {-(clock.offset or 0.0):+.1f} s"
            )
        self._update_consensus(recv_t, new_camera)
        # Everything below in corrected time: receive time as the cameras' consensus has it
        # (the gateway's own while it is trusted).
        gw = self.gateway_offset
        recv_t -= gw
        d -= gw
        offset = (clock.offset - gw) if clock.offset is not None else d
        # A sample older than the estimate says may just be late (buffered, redelivered): keep
        # it unless it is confirmed as a step. One newer than the estimate cannot be explained
        # by delay: the camera clock moved forward, act on it at once.
        deviant = deviant and d < offset
        suspect = abs(offset) > p.max_skew_s
        if suspect != clock.suspect:
            clock.suspect = suspect
            self.notices.append(
                f"camera {camera}: clock skew {-offset:+.1f} s "
                + ("exceeds" if suspect else "back within")
                + f" max_skew_s ({p.max_skew_s:g} s); policy {p.skew_policy}"
            )
        t = event_t
        flags: tuple[str, ...] = ()
        if suspect or deviant:
            if p.skew_policy == "flag":
                flags = ("clock_suspect",)
            elif p.skew_policy == "restamp":
                t = event_t + (d if deviant else offset)
                flags = ("restamped",)
                self.counters["clock_restamped"] += 1
            else:
                t = recv_t
                flags = ("time_from_gateway",)
                self.counters["clock_gateway_time"] += 1
        if t > recv_t + p.max_future_s or t < recv_t - p.max_age_s:
            if p.bad_time_policy == "drop":
                return None
            self.counters["bad_time_restamped"] += 1
            return recv_t, (*flags, "bad_time")
        return t, flags

    def gateway_stepped(self, step: float) -> None:
        """The gateway's wall clock stepped by `step` (the monotonic clock says so): every
        estimate (receive time - event time) moves by it, and so does the gateway's offset; the
        next consensus says whether the gateway is now right (a correction) or wrong."""
        for clock in self._clocks.values():
            clock.shift(step)
        self.gateway_offset += step
        self._stepped = True
        self._consensus_at = None

    def take_notices(self) -> list[str]:
        out, self.notices = self.notices, []
        return out
