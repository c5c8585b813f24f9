"""Open windows per (camera, stream), closing them by event-time watermark or idle timeout.

Pure: no I/O, no clock. The caller passes the gateway time `now` and the receive time of each
message. A window closes when its camera's newest event time passes window end +
allowed_lateness_s, or when the camera has been silent for idle_close_s of gateway time. A
message for a window that already closed opens a late delta: the same (camera, stream, t) with
rev > 0.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.core.model import MAX_CATEGORY_LEN, Chunk
from agent.core.reasons import Reject

DURABLE = sys.maxsize


class Window(Chunk):
    """An open window, with the bookkeeping that tells which of its messages are durable.

    `version` counts the messages merged in; `durable_version` is the version whose state is
    committed (all of them once the closed chunk is committed, or up to a snapshot).
    """

    __slots__ = ("durable_version", "saved_keys", "version")

    def __init__(self, camera: str, stream: str, t: int, width_s: int, rev: int = 0) -> None:
        super().__init__(camera, stream, t, width_s, rev)
        self.version = 0
        self.durable_version = 0
        # Keys of the early-ack snapshots of this window stored in the outbox (dropped when the
        # window's chunk is committed: one durable home per count, G9).
        self.saved_keys: list[tuple[str, str, int, int]] = []


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What to aggregate from a stream's payloads."""

    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    max_categories: int = 32


class _Camera:
    __slots__ = (
        "closed_before",
        "last_recv",
        "late_revs",
        "max_event",
        "msgs",
        "rate",
        "streams",
        "tick_msgs",
        "tick_t",
        "windows",
    )

    def __init__(self) -> None:
        self.msgs = 0
        self.rate = 0.0
        self.streams: set[str] = set()
        self.tick_msgs = 0
        self.tick_t: float | None = None
        self.max_event = -math.inf
        self.last_recv = -math.inf
        # Every window of this camera with t < closed_before is closed.
        self.closed_before = -math.inf
        self.windows: dict[tuple[str, int], Window] = {}
        # (stream, t) -> highest rev emitted, only for windows that had late deltas.
        self.late_revs: dict[tuple[str, int], int] = {}


class Aggregator:
    """All open windows of all cameras."""

    def __init__(
        self,
        *,
        window_s: int,
        allowed_lateness_s: float,
        idle_close_s: float,
        late_policy: Literal["delta", "drop"] = "delta",
        late_memory_s: float = 3600.0,
        max_cameras: int = 10_000,
        max_streams_per_camera: int = 32,
        max_open_windows: int = 200_000,
    ) -> None:
        self.max_cameras = max_cameras
        self.max_streams_per_camera = max_streams_per_camera
        self.max_open_windows = max_open_windows
        self.window_s = window_s
        self.allowed_lateness_s = allowed_lateness_s
        self.idle_close_s = idle_close_s
        self.late_policy = late_policy
        self.late_memory_s = late_memory_s
        # At the camera cap, cameras silent this long with nothing open are forgotten.
        self.forget_after_s = max(60.0, 2 * idle_close_s)
        # Told of every camera forgotten (the camera clock estimates go with it).
        self.on_forget: Callable[[str], None] = lambda camera: None
        self._last_forget = -math.inf
        self._cameras: dict[str, _Camera] = {}
        self.open_count = 0
        self.counters: Counter[str] = Counter()

    # -- intake ---------------------------------------------------------------------------

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
        """Merge one message; return the window holding it, or why it was not counted
        (late_dropped, or a cap: too_many_cameras, too_many_streams, too_many_open_windows;
        the caller counts it). `recv_t` stamps the chunk (wall clock); `mono` (monotonic,
        default recv_t) drives the idle timeout."""
        seen = recv_t if mono is None else mono
        cam = self._cameras.get(camera)
        if cam is None:
            if len(self._cameras) >= self.max_cameras and not self._forget_silent(seen):
                return Reject.too_many_cameras
            cam = self._cameras[camera] = _Camera()
        w = self.window_s
        t = int(event_t // w) * w
        cam.msgs += 1
        if seen > cam.last_recv:
            cam.last_recv = seen
        if event_t > cam.max_event:
            cam.max_event = event_t
            boundary = math.floor((event_t - self.allowed_lateness_s) / w) * w
            if boundary > cam.closed_before:
                cam.closed_before = boundary
        key = (stream, t)
        window = cam.windows.get(key)
        if window is None:
            if stream not in cam.streams:
                if len(cam.streams) >= self.max_streams_per_camera:
                    # The cap is on streams with open windows: forget the others first.
                    cam.streams = {s for s, _ in cam.windows}
                if len(cam.streams) >= self.max_streams_per_camera:
                    return Reject.too_many_streams
                cam.streams.add(stream)
            if self.open_count >= self.max_open_windows:
                return Reject.too_many_open_windows
            rev = 0
            if t < cam.closed_before:
                if self.late_policy == "drop":
                    return Reject.late_dropped
                rev = cam.late_revs.get(key, 0) + 1
                self.counters["late_deltas"] += 1
            window = cam.windows[key] = Window(camera, stream, t, w, rev)
            self.open_count += 1
        elif window.rev:
            self.counters["late_deltas"] += 1
        window.add_times(event_t, recv_t)
        if flags:
            window.flags.update(flags)
        for f in spec.numeric:
            v = payload.get(f)
            if v is None:
                continue
            if _usable_number(v) and window.add_number(f, v, event_t):
                continue
            self.counters["bad_numeric_field"] += 1
        for f in spec.categorical:
            v = payload.get(f)
            if v is None:
                continue
            if type(v) is str and len(v) <= MAX_CATEGORY_LEN:
                window.add_category(f, v, spec.max_categories)
            elif type(v) is bool or (type(v) is int and -_MAX_CATEGORY_INT < v < _MAX_CATEGORY_INT):
                window.add_category(f, str(v).lower(), spec.max_categories)
            else:
                self.counters["bad_categorical_field"] += 1
        window.version += 1
        return window

    def _forget_silent(self, now: float) -> bool:
        """At the camera cap: forget cameras with no open window, silent for forget_after_s,
        so an id flood does not lock honest cameras out for an hour. At most one scan per
        second (a flood of new ids must not make every message scan every camera). True if
        there is room now."""
        if now - self._last_forget < 1.0:
            return False
        self._last_forget = now
        before = now - self.forget_after_s
        for name in [n for n, c in self._cameras.items() if not c.windows and c.last_recv < before]:
            del self._cameras[name]
            self.on_forget(name)
        if len(self._cameras) < self.max_cameras:
            self.counters["cameras_forgotten_at_cap"] += 1
            return True
        return False

    # -- closing --------------------------------------------------------------------------

    def close_due(self, now: float) -> list[Window]:
        """Close every window whose watermark passed, and every window of an idle camera.
        `now` is on the clock passed as `mono` to `add` (monotonic in the agent)."""
        closed: list[Window] = []
        idle_before = now - self.idle_close_s
        forget_before = now - self.late_memory_s
        stale: list[str] = []
        for name, cam in self._cameras.items():
            _tick_rate(cam, now)
            if not cam.windows:
                if cam.last_recv < forget_before:
                    stale.append(name)
                continue
            if cam.last_recv <= idle_before:
                self._close(cam, list(cam.windows), closed)
                continue
            due = [k for k in cam.windows if k[1] < cam.closed_before]
            if due:
                self._close(cam, due, closed)
        for name in stale:
            del self._cameras[name]
            self.on_forget(name)
        return closed

    def close_all(self) -> list[Window]:
        """Close every open window (shutdown)."""
        closed: list[Window] = []
        for cam in self._cameras.values():
            self._close(cam, list(cam.windows), closed)
        return closed

    def _close(self, cam: _Camera, keys: Iterable[tuple[str, int]], out: list[Window]) -> None:
        horizon = cam.closed_before - self.late_memory_s
        for key in keys:
            window = cam.windows.pop(key)
            self.open_count -= 1
            end = window.t + window.width_s
            if end > cam.closed_before:
                cam.closed_before = end
            if window.rev:
                cam.late_revs[key] = window.rev
            out.append(window)
        if cam.late_revs and horizon > -math.inf:
            for key in [k for k in cam.late_revs if k[1] < horizon]:
                del cam.late_revs[key]

    # -- state for early acks and restarts -------------------------------------------------

    def open_windows(self) -> Iterator[Window]:
        for cam in self._cameras.values():
            yield from cam.windows.values()

    def restore(self, chunks: Iterable[Chunk], *, now: float) -> int:
        """Reopen windows saved by an early-ack checkpoint; returns how many."""
        n = 0
        for c in chunks:
            cam = self._cameras.get(c.camera)
            if cam is None:
                cam = self._cameras[c.camera] = _Camera()
            window = Window(c.camera, c.stream, c.t, c.width_s, c.rev)
            window.merge(c)
            window.flags = set(c.flags)
            key = (c.stream, c.t)
            saved_key = (c.camera, c.stream, c.t, c.rev)
            existing = cam.windows.get(key)
            if existing is not None:
                existing.merge(window)
                existing.saved_keys.append(saved_key)
                continue
            window.saved_keys = [saved_key]
            cam.windows[key] = window
            self.open_count += 1
            cam.max_event = max(cam.max_event, c.event_last)
            cam.last_recv = max(cam.last_recv, now)
            n += 1
        return n

    def export_marks(self) -> dict[str, Any]:
        """Per-camera closing marks and late revs, saved at shutdown so revs continue after it."""
        return {
            name: {
                "closed_before": cam.closed_before,
                "max_event": cam.max_event,
                "late_revs": [[s, t, r] for (s, t), r in cam.late_revs.items()],
            }
            for name, cam in self._cameras.items()
            if cam.closed_before > -math.inf
        }

    def import_marks(self, marks: Mapping[str, Any], *, now: float) -> None:
        for name, m in marks.items():
            cam = self._cameras.get(name)
            if cam is None:
                cam = self._cameras[name] = _Camera()
            cam.closed_before = max(cam.closed_before, float(m["closed_before"]))
            cam.max_event = max(cam.max_event, float(m["max_event"]))
            cam.last_recv = max(cam.last_recv, now)
            for s, t, r in m.get("late_revs", ()):
                key = (str(s), int(t))
                cam.late_revs[key] = max(cam.late_revs.get(key, 0), int(r))

    @property
    def camera_count(self) -> int:
        return len(self._cameras)

    def camera_activity(self, now: float, silent_after_s: float) -> tuple[int, int]:
        """(active, silent): cameras heard from within silent_after_s, and the others still
        remembered (a camera restored at a restart counts from the restart)."""
        active = sum(
            1 for cam in self._cameras.values() if cam.msgs and now - cam.last_recv < silent_after_s
        )
        silent = sum(1 for cam in self._cameras.values() if now - cam.last_recv >= silent_after_s)
        return active, silent

    def camera_names(self) -> set[str]:
        """Every camera remembered."""
        return set(self._cameras)

    def silent_cameras(self, now: float, silent_after_s: float) -> set[str]:
        """The remembered cameras not heard from within silent_after_s."""
        return {n for n, cam in self._cameras.items() if now - cam.last_recv >= silent_after_s}

    def camera_info(self, now: float) -> dict[str, dict[str, Any]]:
        """Per camera: last seen, messages, rate, open windows (for /status)."""
        return {
            name: {
                # None: remembered from before a restart, not heard from since it.
                "last_seen_age_s": round(now - cam.last_recv, 1) if cam.msgs else None,
                "messages": cam.msgs,
                "msgs_per_s": round(cam.rate, 2),
                "windows_open": len(cam.windows),
            }
            for name, cam in self._cameras.items()
        }


# An int category must print within MAX_CATEGORY_LEN characters; larger ones are refused before
# str() sees them (str() of an int over 4300 digits raises ValueError).
_MAX_CATEGORY_INT = 10 ** (MAX_CATEGORY_LEN - 1)
# The largest |value| a numeric field may carry: its square (in `sumsq`) stays a finite float.
MAX_NUMERIC_ABS = 1e154


def _usable_number(v: object) -> bool:
    """A JSON number with |v| <= MAX_NUMERIC_ABS (no inf, no NaN, no huge int).

    A larger value would make `sumsq` infinite, which JSON cannot carry (it would go out as
    null). The comparison is exact for ints of any size and never converts them.
    """
    return (type(v) is float or type(v) is int) and -MAX_NUMERIC_ABS <= v <= MAX_NUMERIC_ABS


def _tick_rate(cam: _Camera, now: float) -> None:
    if cam.tick_t is None:
        cam.tick_t, cam.tick_msgs = now, cam.msgs
        return
    dt = now - cam.tick_t
    if dt >= 1.0:
        inst = (cam.msgs - cam.tick_msgs) / dt
        cam.rate = inst if cam.rate == 0.0 else 0.7 * cam.rate + 0.3 * inst
        cam.tick_t, cam.tick_msgs = now, cam.msgs
