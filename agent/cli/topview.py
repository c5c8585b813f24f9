"""What `edge-agent top` shows, from two samples of the agent's /status and /status/cameras.

Pure: samples in, lines out, so the figures can be checked without a terminal. Every field is
read with a default, so an agent with more or fewer fields (an older or newer version) still
renders. Rates come from counter deltas between the two samples.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.core.text import duration_words

SortKey = Literal["problem", "rate", "name", "skew", "last"]
SORT_KEYS: dict[str, SortKey] = {
    "p": "problem",
    "r": "rate",
    "n": "name",
    "k": "skew",
    "l": "last",  # last seen, longest silent first
}
Style = Literal["", "title", "problem", "head", "dim"]
Line = tuple[str, Style]


@dataclass(frozen=True, slots=True)
class Sample:
    """One poll of the agent: its documents, or why they could not be had."""

    at: float  # monotonic
    status: Mapping[str, Any] | None = None
    cameras: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ViewOptions:
    url: str
    interval_s: float = 2.0
    sort: SortKey = "problem"
    silent_s: float = 30.0
    width: int = 120
    height: int = 40
    max_rows: int | None = None  # cameras shown at most, whatever the height


def get(doc: Mapping[str, Any] | None, *path: str, default: Any = None) -> Any:
    """doc[a][b]... or `default` when any level is missing or not a mapping."""
    cur: Any = doc
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return default
        cur = cur[key]
    return default if cur is None else cur


def num(n: float | None) -> str:
    """12,345 / 3.5 / — for a missing figure."""
    if n is None:
        return "—"
    if isinstance(n, float) and not n.is_integer():
        return f"{n:,.1f}"
    return f"{int(n):,}"


def age(seconds: float | None) -> str:
    return "—" if seconds is None else duration_words(seconds)


def size(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate(prev: Sample | None, cur: Sample, *path: str) -> float | None:
    """Per second between the two samples; None without a previous one or after a restart."""
    if prev is None or prev.status is None or cur.status is None or cur.at <= prev.at:
        return None
    a, b = get(prev.status, *path), get(cur.status, *path)
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b < a:
        return None
    return (b - a) / (cur.at - prev.at)


@dataclass(frozen=True, slots=True)
class CameraRow:
    name: str
    rate: float
    messages: int
    last_seen_s: float
    skew_s: float | None
    spread_s: float | None
    jumps: int
    windows_open: int
    flags: tuple[str, ...]
    silent: bool

    @property
    def rank(self) -> int:
        """How much attention it needs: silent 3, clock suspect 2, other trouble 1, fine 0."""
        if self.silent:
            return 3
        if "clock_suspect" in self.flags:
            return 2
        return 1 if self.flags or self.jumps else 0

    @property
    def state(self) -> str:
        words = [f"SILENT {age(self.last_seen_s)}"] if self.silent else []
        words += ["CLOCK SUSPECT" if f == "clock_suspect" else f for f in self.flags]
        if self.jumps:
            words.append(f"{self.jumps} clock jumps")
        return ", ".join(words) or "ok"


def camera_rows(prev: Sample | None, cur: Sample, silent_s: float) -> list[CameraRow]:
    by_id = get(cur.cameras, "by_id", default={})
    before = get(prev.cameras, "by_id", default={}) if prev else {}
    dt = cur.at - prev.at if prev and prev.cameras else 0.0
    rows = []
    for name, info in by_id.items():
        msgs = int(get(info, "messages", default=0))
        was = get(before.get(name), "messages")
        r = (msgs - was) / dt if dt > 0 and isinstance(was, int) and msgs >= was else None
        last = float(get(info, "last_seen_age_s", default=0.0))
        rows.append(
            CameraRow(
                name=str(name),
                rate=float(get(info, "msgs_per_s", default=0.0)) if r is None else r,
                messages=msgs,
                last_seen_s=last,
                skew_s=get(info, "skew_s"),
                spread_s=get(info, "skew_spread_s"),
                jumps=int(get(info, "clock_jumps", default=0)),
                windows_open=int(get(info, "windows_open", default=0)),
                flags=tuple(get(info, "flags", default=())),
                silent=last >= silent_s,
            )
        )
    return rows


def sort_rows(rows: list[CameraRow], key: SortKey) -> list[CameraRow]:
    def skew(r: CameraRow) -> float:
        return abs(r.skew_s) if r.skew_s is not None else 0.0

    keys = {
        "problem": lambda r: (-r.rank, -skew(r), -r.last_seen_s, r.name),
        "rate": lambda r: (-r.rate, r.name),
        "name": lambda r: (r.name,),
        "skew": lambda r: (-skew(r), r.name),
        "last": lambda r: (-r.last_seen_s, r.name),
    }
    return sorted(rows, key=keys[key])


def cloud_state(status: Mapping[str, Any]) -> tuple[str, bool]:
    """(what the cloud side is doing, whether it is a problem)."""
    fw = get(status, "forward", default={})
    cloudy = [p for p in get(status, "problems", default=[]) if "cloud" in str(p).lower()]
    if get(fw, "token_problem"):
        return str(fw["token_problem"]), True
    if cloudy:
        return str(cloudy[0]), True
    backoff, error = get(fw, "backoff_remaining_s"), get(fw, "last_error")
    last = get(fw, "last_success_age_s")
    if backoff and error:
        since = f"no success for {age(last)}, " if last is not None else ""
        return f"FAILING: {since}retrying in {backoff:.0f} s after: {error}", True
    if last is None:
        return ("idle, nothing sent yet" if not get(status, "outbox", "chunks") else
                "nothing accepted yet"), False  # fmt: skip
    return f"ok, last answer {age(last)} ago", False


def render(prev: Sample | None, cur: Sample, o: ViewOptions) -> list[Line]:
    """The whole screen, top to bottom; the camera table is cut to fit `o.height`."""
    clock = time.strftime("%H:%M:%S", time.gmtime()) + "Z"
    st = cur.status
    if st is None:
        down: list[Line] = [
            (f"edge-agent top  {o.url}  every {o.interval_s:g} s  {clock}", "title"),
            (f"agent not reachable at {o.url}: {cur.error}; retrying", "problem"),
        ]
        return [(text[: o.width], style) for text, style in down]
    up = age(get(st, "uptime_s"))
    lines: list[Line] = [
        (
            f"edge-agent top  {get(st, 'gateway_id', default='?')} (edge-agent "
            f"{get(st, 'version', default='?')}, up {up})  {o.url}  every {o.interval_s:g} s  "
            f"{clock}",
            "title",
        )
    ]
    problems = list(get(st, "problems", default=[]))
    ready = get(st, "ready", default=False)
    lines.append(("READY" if ready else "NOT READY", "" if ready else "problem"))
    lines += [(f"PROBLEM  {p}", "problem") for p in problems]
    lines += _stages(prev, cur, st)
    lines += _cameras(prev, cur, o, o.height - len(lines))
    return [(text[: o.width], style) for text, style in lines]


def _stages(prev: Sample | None, cur: Sample, st: Mapping[str, Any]) -> list[Line]:
    mq, ing, ob, fw = (get(st, k, default={}) for k in ("mqtt", "ingest", "outbox", "forward"))
    counted_rate = rate(prev, cur, "ingest", "counted")
    if counted_rate is None:
        counted_rate = get(ing, "msgs_per_s_10s")
    mqtt = (
        f"connected {age(time.time() - mq['since'])}" if get(mq, "connected") and get(mq, "since")
        else "connected" if get(mq, "connected") else "DISCONNECTED"
    )  # fmt: skip
    rejects = get(ing, "rejects", default={})
    reject_parts = []
    for reason, n in sorted(rejects.items(), key=lambda kv: -kv[1]):
        r = rate(prev, cur, "ingest", "rejects", reason)
        reject_parts.append(f"{reason} {num(n)}" + (f" ({r:.1f}/s)" if r else ""))
    chunks_rate = rate(prev, cur, "forward", "chunks_sent")
    usage = get(ob, "usage_of_max_bytes")
    outbox = (
        f"{num(get(ob, 'chunks'))} chunks, {size(get(ob, 'bytes'))}, oldest "
        f"{age(get(ob, 'oldest_unsent_age_s'))}, "
        + (f"{usage * 100:.1f}% of quota" if usage is not None else "quota —")
        + (", FULL" if get(ob, "full") else "")
        + (f", {num(get(ob, 'dead_letters'))} dead letters" if get(ob, "dead_letters") else "")
    )
    backoff = get(fw, "backoff_remaining_s")
    forward = (
        f"{num(chunks_rate)} chunks/s, pace {num(get(fw, 'pace_chunks_per_s'))} chunks/s, "
        f"{num(get(fw, 'chunks_sent'))} chunks in {num(get(fw, 'batches_sent'))} batches, "
        f"{num(get(fw, 'batches_failed'))} failed, last success "
        f"{age(get(fw, 'last_success_age_s'))} ago"
        + (f", backoff {backoff:.1f} s" if backoff else "")
    )
    cloud, cloud_bad = cloud_state(st)
    agg = get(st, "aggregate", default={})
    return [
        ("", ""),
        (
            f"MQTT in   {mqtt}, {num(get(mq, 'reconnects'))} reconnects  "
            f"{num(round(counted_rate, 1) if counted_rate is not None else None)} msgs/s  "
            f"received {num(get(ing, 'received'))}, counted {num(get(ing, 'counted'))}, "
            f"unacked {num(get(ing, 'unacked'))}",
            "" if get(mq, "connected") else "problem",
        ),
        (f"rejects   {', '.join(reject_parts) or 'none'}", "problem" if reject_parts else ""),
        (
            f"windows   {num(get(agg, 'windows_open'))} open, "
            f"{num(get(agg, 'late_deltas', default=0))} late deltas",
            "",
        ),
        (f"outbox    {outbox}", "problem" if get(ob, "full") else ""),
        (f"forward   {forward}", ""),
        (f"cloud     {cloud}", "problem" if cloud_bad else ""),
    ]


def _cameras(prev: Sample | None, cur: Sample, o: ViewOptions, room: int) -> list[Line]:
    if cur.cameras is None:
        return [("", ""), (f"cameras   detail not available: {cur.error or '?'}", "problem")]
    rows = sort_rows(camera_rows(prev, cur, o.silent_s), o.sort)
    silent = sum(r.silent for r in rows)
    suspect = sum("clock_suspect" in r.flags for r in rows)
    publishing = sum(not r.silent for r in rows)
    keys = " · ".join(f"{k} {v}" for k, v in SORT_KEYS.items())
    out: list[Line] = [
        ("", ""),
        (
            f"cameras   {num(len(rows))} known, {num(publishing)} publishing, {num(silent)} "
            f"silent (> {o.silent_s:g} s), {num(suspect)} clock suspect",
            "problem" if silent or suspect else "",
        ),
        (f"sorted by {o.sort}   keys: {keys} · s next · q quit", "dim"),
        (
            f"{'CAMERA':<24} {'MSG/S':>8} {'MESSAGES':>10} {'LAST SEEN':>9} {'SKEW S':>9} "
            f"{'SPREAD':>7} {'OPEN':>5}  STATE",
            "head",
        ),
    ]
    fit = max(0, room - len(out) - 1)
    if o.max_rows is not None:
        fit = min(fit, o.max_rows)
    # The line that says how many are left out would take the last row's place: show that row.
    shown = rows if len(rows) <= fit + (o.max_rows is None) else rows[:fit]
    for r in shown:
        skew = f"{round(r.skew_s, 2) + 0.0:+.2f}" if r.skew_s is not None else "—"
        spread = f"{r.spread_s:.2f}" if r.spread_s is not None else "—"
        out.append(
            (
                f"{r.name[:24]:<24} {r.rate:>8.1f} {r.messages:>10,} {age(r.last_seen_s):>9} "
                f"{skew:>9} {spread:>7} {r.windows_open:>5}  {r.state}",
                "problem" if r.rank >= 2 else "",
            )
        )
    if len(shown) < len(rows):
        out.append((f"… {num(len(rows) - len(shown))} more cameras (sorted by {o.sort})", "dim"))
    return out
