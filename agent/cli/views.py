"""What `edge-agent status` and `edge-agent deadletter` print for a person: pure functions from
the documents (/status JSON, dead-letter rows) to lines, with `now` passed in."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from agent.core.text import duration_words, one_line, rfc3339


def _n(count: int, word: str) -> str:
    """'1 chunk', '3 chunks'."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _ago(stamp: str | None, now: float) -> str:
    """'2026-11-26T15:35:09Z (3 s ago)' from an RFC 3339 stamp; 'never' for None."""
    if not stamp:
        return "never"
    try:
        t = datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return stamp
    return f"{stamp} ({duration_words(max(0.0, now - t))} ago)"


def status_lines(doc: dict[str, Any], now: float) -> list[str]:
    """The /status document as problems first, then a short table, then READY / NOT READY."""
    problems = list(doc.get("problems", []))
    ob, fw, ing = doc["outbox"], doc["forward"], doc["ingest"]
    mq, cams = doc["mqtt"], doc["cameras"]
    if doc.get("drops"):
        problems.append(f"data dropped: {doc['drops']}")
    if ob.get("dead_letters"):
        problems.append(
            f"{_n(ob['dead_letters'], 'chunk')} in the dead letters (edge-agent deadletter list)"
        )
    lines = [f"PROBLEM  {p}" for p in problems]
    rejects = ", ".join(f"{k} {v}" for k, v in sorted(ing["rejects"].items()) if v) or "none"
    if mq["connected"]:
        mqtt = f"connected since {_ago(mq.get('since') and rfc3339(mq['since']), now)}"
    else:
        down = mq.get("down_since")
        mqtt = "DISCONNECTED" + (f" since {_ago(down, now)}" if down else "") + ", reconnecting"
    mqtt += (
        f"; {mq['reconnects']} reconnects, {mq.get('connect_failures', 0)} failed connects "
        "or lost connections"
    )
    active, silent = cams.get("active"), cams.get("silent")
    if active is None:  # an older agent
        cameras = f"{cams['count']}"
    else:
        cameras = (
            f"{active} active, {silent} silent (nothing for {cams['silent_after_s']:g} s), "
            f"{cams['count']} remembered"
        )
    rows = [
        ("gateway", f"{doc['gateway_id']}  (edge-agent {doc['version']}, "
         f"up {duration_words(doc['uptime_s'])})"),
        ("mqtt", mqtt),
        ("ingest", f"{ing['msgs_per_s_10s']} msgs/s (10 s), {ing['msgs_per_s_60s']} msgs/s (60 s), "
         f"{ing['unacked']} unacked"),
        ("rejects", rejects),
        ("cameras", f"{cameras}; {doc['aggregate']['windows_open']} windows open"),
    ]  # fmt: skip
    if cams.get("clock_suspect"):
        ids = cams.get("clock_suspect_ids") or []
        more = cams["clock_suspect"] - len(ids)
        rows.append(
            (
                "clocks",
                f"{_n(cams['clock_suspect'], 'camera')} off by more than {cams['max_skew_s']:g} s: "
                + ", ".join(ids)
                + (f" and {more} more (/status/cameras)" if more > 0 else ""),
            )
        )
    oldest = ob["oldest_unsent_age_s"]
    rows += [
        ("backlog", f"{ob['chunks']} chunks, oldest "
         f"{'none' if oldest is None else duration_words(oldest)}, "
         f"{ob['usage_of_max_bytes'] * 100:.1f}% of max_bytes"),
        ("cloud", f"last success {_ago(fw.get('last_success_at'), now)}, "
         f"{fw['batches_sent']} batches sent, {fw['batches_failed']} failed, "
         f"pace {fw['pace_chunks_per_s']:.0f} chunks/s"),
    ]  # fmt: skip
    if fw.get("failing_since"):
        rows.append(
            (
                "failing",
                f"since {_ago(fw['failing_since'], now)}, "
                f"{_n(fw.get('failures_in_row', 0), 'failed attempt')} "
                f"(a problem after {fw.get('alert_after_s', 0):g} s)",
            )
        )
    if fw.get("last_error"):
        at = fw.get("last_error_at")
        rows.append(("last error", (f"{_ago(at, now)}: " if at else "") + str(fw["last_error"])))
    lines += [f"{k:<10} {v}" for k, v in rows]
    lines.append("READY" if doc.get("ready") else "NOT READY")
    return lines


def deadletter_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per dead letter: seq, when, what it holds, the cloud's answer."""
    lines = []
    for r in rows:
        when = rfc3339(r["created_at"])
        what = (
            f"{r['camera']}/{r['stream']} t={r['t']} ({rfc3339(r['t'])}) {r['messages']} msgs"
            if r.get("camera") is not None
            else "unreadable chunk"
        )
        lines.append(
            f"seq {r['seq']:>16}  {when}  {what}  HTTP {r['status']}  {r['bytes']} B  "
            f"{_one_line(r['response'], 120)}"
        )
    return lines


def deadletter_detail(doc: dict[str, Any]) -> list[str]:
    """`deadletter show SEQ`: every field, the cloud's whole stored answer, the chunk."""
    lines = [
        f"seq          {doc['seq']}"
        + (f" (stood for ..{doc['seq_end']})" if doc["seq_end"] else ""),
        f"created      {rfc3339(doc['created_at'])}",
        f"camera       {doc['camera']}",
        f"stream       {doc['stream']}",
        f"second       {doc['t']} ({rfc3339(doc['t'])})" if doc["t"] is not None else "second",
        f"width_s      {doc['width_s']}   rev {doc['rev']}",
        f"messages     {doc['messages']}",
        f"size         {doc['bytes']} B",
        f"cloud said   HTTP {doc['status']}",
        "answer:",
        "  " + _one_line(doc["response"], 4096),
        "chunk:",
    ]
    chunk = doc.get("chunk")
    lines += ["  " + line for line in json.dumps(chunk, indent=2).splitlines()]
    return lines


def _one_line(text: str | None, limit: int) -> str:
    return one_line(text, limit) if text else "(no answer)"
