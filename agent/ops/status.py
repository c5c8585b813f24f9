"""What the agent says about itself: /status, /readyz and /healthz answers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.core.text import rfc3339
from agent.forward.outage import outage_problems
from agent.ops.figures import status_section

if TYPE_CHECKING:
    from agent.core.stats import Stats
    from agent.ops.pipeline import Pipeline

# A remembered camera not heard from for this long is silent (/status, /metrics).
SILENT_AFTER_S = 60.0
# Checkpoint commits failing this long is a readiness problem (a failing disk, G13).
CHECKPOINT_FAILING_AFTER_S = 1.0
# A broker that lost the agent's session is a readiness problem for this long after.
SESSION_LOST_SHOWN_S = 600.0
# Clock-suspect camera ids named in /status (the full list is in /status/cameras).
SUSPECT_IDS_SHOWN = 20


def ready_problems(p: Pipeline) -> list[str]:
    """Reasons the agent is not ready (empty: ready)."""
    problems = []
    if not p.session.is_subscribed:
        refused = p.stats.mqtt_refused
        problems.append(f"MQTT {refused}" if refused else "MQTT not connected and subscribed")
    else:
        problems.extend(p.stats.subscription_problems)
    lost_at = p.stats.mqtt_session_lost_at
    if lost_at is not None and time.time() - lost_at < SESSION_LOST_SHOWN_S:
        problems.append(
            f"MQTT broker had no session for us at {rfc3339(lost_at)}: messages published "
            "while the agent was away may be lost (broker restarted without persistence, or "
            "the session expired)"
        )
    if p.forwarder.unhealthy_reason:
        problems.append(p.forwarder.unhealthy_reason)
    if p.outbox.problem:
        problems.append(p.outbox.problem)
    if p.forwarder.token_problem:
        problems.append(p.forwarder.token_problem)
    clocks = p.clocks
    if not clocks.gateway_trusted:
        agree, known = clocks.consensus
        problems.append(
            f"gateway clock off by {_duration(clocks.gateway_offset)} against the cameras "
            f"({agree} of {known} agree): camera times are kept and receive times corrected; "
            "set the gateway's time (NTP, RTC)"
        )
    failing_since = p.checkpointer.failing_since
    if failing_since is not None:
        failing_s = time.monotonic() - failing_since
        if failing_s >= CHECKPOINT_FAILING_AFTER_S:
            paused = (
                f"; taking no more messages at mqtt.receive_maximum = "
                f"{p.settings.mqtt.receive_maximum:,} unacked"
                if p.stats.intake_paused
                else ""
            )
            problems.append(
                f"outbox writes failing for {failing_s:.0f} s ({p.checkpointer.last_failure}): "
                f"MQTT acks held{paused}; check the disk of buffer.path "
                f"({p.settings.buffer.path})"
            )
    if p.checkpointer.buffer_full:
        if p.outbox.chunk_count == 0 and p.outbox.batch is None:
            # Nothing the cloud could drain: open-window snapshots and the ack journal fill it.
            problems.append(
                "outbox full with nothing to send (open-window snapshots and the ack journal "
                f"fill it): buffer.max_bytes = {p.settings.buffer.max_bytes:,} is too small for "
                "this load; raise it"
            )
        else:
            problems.append("outbox full: holding MQTT acks until the cloud drains it")
    problems.extend(outage(p, time.time()))
    return problems


def outage(p: Pipeline, now: float) -> list[str]:
    """The cloud unreachable, or the backlog waiting, for forward.alert_after_s or longer."""
    st = p.stats
    return outage_problems(
        now=now,
        alert_after_s=p.settings.forward.alert_after_s,
        failing_since=st.forward_failing_since,
        last_error=st.last_forward_error,
        oldest_unsent_at=p.outbox.oldest_created_at,
    )


def alive_problems(p: Pipeline, tasks_done: list[str], now_mono: float) -> list[str]:
    """Reasons the agent is not alive: a pipeline task ended, or the checkpoint loop stalled."""
    problems = [f"task {name} ended" for name in tasks_done]
    last = p.checkpointer.last_commit_mono
    limit_s = stall_limit_s(p)
    if last is not None and now_mono - last > limit_s:
        problems.append(f"no checkpoint for {now_mono - last:.0f} s (limit {limit_s:.0f} s)")
    return problems


def stall_limit_s(p: Pipeline) -> float:
    return max(2.0, 20 * p.settings.buffer.checkpoint_interval_ms / 1000)


def ingest_rate(st: Stats, window_s: float, now_mono: float) -> float:
    """Messages counted per second over the last `window_s` (the checkpoints' samples), or
    since the agent's first message when that came later: the seconds before it are not
    averaged in. An agent started 10 s before its cameras, 18 s up, counts 200 msgs/s as 200,
    not as 8 s of messages over 18 s (86); once messages flow, a pause is averaged in."""
    samples = st.samples
    if not samples:
        return 0.0
    newest_t, newest = samples[-1]
    base_t, base = newest_t, newest
    for t, n in reversed(samples):
        if t < now_mono - window_s:
            break
        base_t, base = t, n
        if n == 0:  # counted starts at 0: the last sample before the first message
            break
    return (newest - base) / (newest_t - base_t) if newest_t > base_t else 0.0


def status_document(p: Pipeline) -> dict[str, Any]:
    """The /status JSON (schema in docs/reference.md): what flows, what waits, what was rejected."""
    st, ob, fw = p.stats, p.outbox, p.forwarder
    now, mono = time.time(), time.monotonic()
    oldest = ob.oldest_created_at
    return {
        "version": __version__,
        "gateway_id": p.settings.gateway_id,
        "uptime_s": round(now - st.started_at, 1),
        "ready": not ready_problems(p),
        "problems": ready_problems(p),
        # The plain figures come from agent/ops/figures.py (shared with /metrics); the rest here.
        "mqtt": {
            **status_section(p, "mqtt"),
            "since": st.mqtt_connected_since,
            "down_since": _stamp(st.mqtt_down_since),
            "session_lost_at": _stamp(st.mqtt_session_lost_at),
        },
        "ingest": {
            **status_section(p, "ingest"),
            "msgs_per_s_10s": round(ingest_rate(st, 10, mono), 1),
            "msgs_per_s_60s": round(ingest_rate(st, 60, mono), 1),
            "rejects": dict(st.rejects),
        },
        "aggregate": {
            **status_section(p, "aggregate"),
            **dict(p.aggregator.counters),
            **dict(p.clocks.counters),
        },
        "cameras": camera_summary(p),
        "outbox": {
            **status_section(p, "outbox"),
            "oldest_unsent_age_s": round(now - oldest, 1) if oldest else None,
            "events": dict(st.outbox_events),
        },
        "forward": {
            **status_section(p, "forward"),
            "last_success_age_s": round(now - st.last_forward_ok, 1)
            if st.last_forward_ok
            else None,
            "last_success_at": _stamp(st.last_forward_ok),
            "last_error": st.last_forward_error,
            "last_error_at": _stamp(st.last_forward_error_at),
            "failing_since": _stamp(st.forward_failing_since),
            "token_problem": p.forwarder.token_problem,
            "backoff_remaining_s": round(max(0.0, fw.backoff_until - now), 1)
            if fw.backoff_until
            else None,
        },
        "drops": dict(st.drops),
    }


def camera_summary(p: Pipeline) -> dict[str, Any]:
    """The cameras in /status: counts (and at most SUSPECT_IDS_SHOWN clock-suspect ids), so its
    size does not grow with the site. `count` is every camera remembered (an hour after its
    last message); `active` those heard from within SILENT_AFTER_S, `silent` the others."""
    active, silent = p.aggregator.camera_activity(time.monotonic(), SILENT_AFTER_S)
    suspects = sorted(name for name, clock in p.clocks.items() if clock.suspect)
    return {
        "count": p.aggregator.camera_count,
        "active": active,
        "silent": silent,
        "silent_after_s": SILENT_AFTER_S,
        "clock_suspect": len(suspects),
        "clock_suspect_ids": suspects[:SUSPECT_IDS_SHOWN],
        "max_skew_s": p.settings.aggregate.max_skew_s,
        "detail": "/status/cameras",
    }


def _duration(seconds: float) -> str:
    """'+365.0 d', '-2.5 h', '+95 s': a signed offset an operator reads at a glance."""
    a = abs(seconds)
    sign = "+" if seconds >= 0 else "-"
    if a >= 2 * 86400:
        return f"{sign}{a / 86400:.1f} d"
    if a >= 2 * 3600:
        return f"{sign}{a / 3600:.1f} h"
    return f"{sign}{a:.0f} s"


def _stamp(t: float | None) -> str | None:
    return None if t is None else rfc3339(t)


def camera_document(p: Pipeline) -> dict[str, Any]:
    """/status/cameras: every camera's traffic and clock (10,000 cameras: about 2 MB)."""
    return camera_section(p, time.monotonic())


def camera_section(p: Pipeline, now: float) -> dict[str, Any]:
    """Cameras: traffic from the aggregator, clock state from the clock estimates."""
    by_id = p.aggregator.camera_info(now)
    max_skew_s = p.settings.aggregate.max_skew_s
    suspect = 0
    for name, clock in p.clocks.items():
        info = by_id.get(name)
        if info is None:
            continue
        skew = clock.skew_s
        flags = ["clock_suspect"] if clock.suspect else []
        suspect += clock.suspect
        info.update(
            skew_s=None if skew is None else round(skew, 3),
            skew_spread_s=round(clock.spread, 3),
            clock_jumps=clock.jumps,
            flags=flags,
        )
    for info in by_id.values():
        info.setdefault("skew_s", None)
        info.setdefault("flags", [])
    return {
        "count": len(by_id),
        "clock_suspect": suspect,
        "max_skew_s": max_skew_s,
        "by_id": by_id,
    }


def status_line(p: Pipeline) -> str:
    """One line for systemd's STATUS=: rate, cameras, backlog, cloud."""
    st, ob = p.stats, p.outbox
    oldest = ob.oldest_created_at
    age = f", oldest {time.time() - oldest:.0f} s" if oldest else ""
    cloud = p.forwarder.unhealthy_reason or ("retrying" if p.forwarder.backoff_until else "ok")
    active, _ = p.aggregator.camera_activity(time.monotonic(), SILENT_AFTER_S)
    line = (
        f"{ingest_rate(st, 10, time.monotonic()):.0f} msgs/s, {active} of "
        f"{p.aggregator.camera_count} cameras active, "
        f"outbox {ob.chunk_count} chunks{age}, cloud: {cloud}"
    )
    return line[:200]
