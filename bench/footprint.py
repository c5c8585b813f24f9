"""Footprint: 300 cameras x 10 msgs/s (3,000 msgs/s) for 60 s into the agent.

The camera simulator (agent.sim.procs.Publisher: paho, QoS 1, 2 processes) publishes to a
private Mosquitto; the agent runs with the shipped defaults (window 1 s, allowed lateness 2 s,
idle close 5 s, checkpoint 250 ms, synchronous = full, linger 200 ms) and forwards to the
reference receiver. Measured on the agent's pid from /proc:

  CPU          utime + stime over the steady part of the publishing (from 5 s after the start,
               once windows close, to the end), as % of one core
  peak RSS     VmHWM at the end of the run (the kernel's high-water mark, whole lifetime)
  write_bytes  /proc/PID/io write_bytes: per second during publishing, and over the whole run
               (first message to outbox drained) per byte of chunk JSON produced ("flash wear")
  delay        from the receiver's SQLite: received_at of each chunk minus the publish time
               (payload ts = event time) of its oldest message (event_first: an upper bound for
               every message of the chunk) and of its newest (event_last: a lower bound),
               weighted by the chunk's message count

Baselines in the same run:
  bare aiomqtt subscriber (bench.bare_sub) on the same broker at the same time, receiving the
    same messages: its CPU and peak RSS
  raw SQLite: a child process writes the very same chunk bodies into the same table with the
    agent's commit cadence (its number of checkpoints and batches), WAL + synchronous FULL,
    inserting then deleting, and reports its own write_bytes: the floor for "durably queue these
    chunks"; the difference is what the agent adds (ack journal, open-window state, ...)
  delay floor: window + allowed lateness + checkpoint interval + linger (the design's own wait)

    python -m bench.footprint [--quick] [--duration S]
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.common import (
    GATEWAY_ID,
    ROOT,
    BareSub,
    Mosquitto,
    ProcStat,
    Receiver,
    Report,
    Sampler,
    agent_figure,
    bench_command,
    fresh_dir,
    kill_quietly,
    parser,
    ratio,
    say,
    start_agent,
    wait_for,
    weighted_percentile,
)
from devtools.procs import Publisher

CAMERAS = 300
# Issue #20: with pydantic-settings loaded (it was 60 MB without pydantic, issue #13).
PEAK_RSS_TARGET_MB = 70
RATE = 10.0
WINDOW_S = 1.0
LATENESS_S = 2.0  # shipped default
IDLE_CLOSE_S = 5.0  # shipped default
CHECKPOINT_S = 0.25
LINGER_S = 0.2
WARMUP_S = 5.0


# -- the raw SQLite baseline (runs in a child process, to read its own /proc/self/io) ----------


def sqlite_baseline(db: Path, bodies_file: Path, commits: int, batches: int) -> dict[str, Any]:
    bodies: list[bytes] = msgspec.msgpack.decode(bodies_file.read_bytes())
    before = ProcStat(os.getpid()).io()
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute(
        "CREATE TABLE chunks (seq INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL,"
        " body BLOB NOT NULL)"
    )
    commits = max(1, commits)
    per = max(1, -(-len(bodies) // commits))
    delete_every = max(1, round(commits / max(1, batches)))
    last_seq = 0
    k = 0
    for i in range(0, len(bodies), per):
        group = bodies[i : i + per]
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "INSERT INTO chunks (created_at, body) VALUES (?, ?)", [(time.time(), b) for b in group]
        )
        con.execute("COMMIT")
        k += 1
        if k % delete_every == 0:
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM chunks WHERE seq <= ?", (last_seq,))
            con.execute("COMMIT")
        last_seq += len(group)
    con.execute("BEGIN IMMEDIATE")
    con.execute("DELETE FROM chunks")
    con.execute("COMMIT")
    con.close()
    after = ProcStat(os.getpid()).io()
    return {
        "write_bytes": after["write_bytes"] - before["write_bytes"],
        "cancelled_write_bytes": after["cancelled_write_bytes"] - before["cancelled_write_bytes"],
        "commits": k,
        "delete_every": delete_every,
    }


# -- the run ----------------------------------------------------------------------------------


def chunk_rows(db: Path, gateway: str) -> list[tuple[float, dict[str, Any]]]:
    con = sqlite3.connect(db)
    try:
        return [
            (float(r), json.loads(b))
            for r, b in con.execute(
                "SELECT received_at, body FROM chunks WHERE gateway = ? ORDER BY seq", (gateway,)
            )
        ]
    finally:
        con.close()


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "")
    p.add_argument("--duration", type=float, help="seconds of publishing")
    p.add_argument("--sqlite-baseline", nargs=4, metavar=("DB", "BODIES", "COMMITS", "BATCHES"),
                   help="internal: run the raw SQLite baseline")  # fmt: skip
    args = p.parse_args(argv)
    if args.sqlite_baseline:
        db, bodies, commits, batches = args.sqlite_baseline
        print(json.dumps(sqlite_baseline(Path(db), Path(bodies), int(commits), int(batches))))
        return 0
    duration = args.duration or (32.0 if args.quick else 60.0)
    rep = Report("footprint", args.quick)
    work = fresh_dir("footprint")
    broker = receiver = agent = bare = None
    try:
        broker = Mosquitto(work / "mosquitto").start()
        receiver = Receiver(work / "cloud").start()
        agent = start_agent(work, broker.port, receiver.url)
        bare = BareSub(broker.port, work / "bare.log")
        bare.wait_ready()
        assert agent.popen is not None and broker.popen is not None
        apid = agent.popen.pid
        ast = ProcStat(apid)
        sampler = Sampler(
            {"agent": apid, "bare": bare.pid, "broker": broker.popen.pid}, interval_s=0.5
        )
        sampler.start()
        time.sleep(1.0)
        idle_rss_kb = ast.rss_kb()
        log_size0 = (work / "agent.log").stat().st_size
        io0 = ast.io()
        st0 = agent.status() or {}
        say(
            f"[footprint] {CAMERAS} cameras x {RATE:g} msgs/s for {duration:g} s "
            f"(simulator, 2 processes); agent idle RSS {idle_rss_kb / 1024:.1f} MB"
        )
        pub = Publisher(
            broker, work, cameras=CAMERAS, rate=RATE, duration_s=duration, seed=11, processes=2
        )
        pub_start_wall = time.time()
        pub.start()
        t_pub0 = time.monotonic()
        io_pub = None
        while pub.running:
            pub.wait(0.5)
            if io_pub is None and time.monotonic() - t_pub0 >= 1.5 + duration:
                io_pub = (time.monotonic(), ast.io())
        t_pub1 = time.monotonic()
        pub_end_wall = time.time()
        if io_pub is None:
            io_pub = (t_pub1, ast.io())
        acked = int(pub.summary.get("acked", 0))
        expected = None
        try:
            expected = pub.join()
        except Exception as e:
            rep.note(f"simulator ground truth unavailable: {e}")
        # Everything at the receiver, then the outbox drained (the deletes are part of the wear).
        try:
            wait_for(lambda: receiver.messages() >= acked, timeout_s=IDLE_CLOSE_S + 30,
                     what="every message at the receiver", poll_s=0.5)  # fmt: skip
            wait_for(lambda: agent_figure(agent, "outbox", "chunks") == 0, timeout_s=20,
                     what="outbox drained", poll_s=0.2)  # fmt: skip
        except TimeoutError as e:
            rep.note(str(e))
        time.sleep(0.5)
        io1 = ast.io()
        hwm_kb = ast.hwm_kb()
        bare_hwm_kb = ProcStat(bare.pid).hwm_kb()
        st1 = agent.status() or {}
        log_growth = (work / "agent.log").stat().st_size - log_size0
        sampler.stop()
        delivered = receiver.messages()
        bare_count = bare.count
    finally:
        kill_quietly(bare, agent)
    try:
        rows = chunk_rows(receiver.db, GATEWAY_ID)
    finally:
        kill_quietly(receiver, broker)

    # CPU over the steady part of the publishing, and over each half of it.
    c0, c1 = t_pub0 + WARMUP_S, t_pub1 - 1.0
    cpu_agent = sampler.cpu_between("agent", c0, c1)
    cpu_bare = sampler.cpu_between("bare", c0, c1)
    cpu_broker = sampler.cpu_between("broker", c0, c1)
    rate = acked / duration if duration else 0
    mid = (c0 + c1) / 2
    phase_a, phase_b = (c0, mid), (mid, c1)
    cpu_a = sampler.cpu_between("agent", *phase_a)
    cpu_b = sampler.cpu_between("agent", *phase_b)
    rep.figure("agent_cpu_pct_first_half", None if cpu_a is None else round(cpu_a * 100, 1))
    rep.figure("agent_cpu_pct_second_half", None if cpu_b is None else round(cpu_b * 100, 1))
    rep.figure("published_acked", acked)
    rep.figure("delivered_messages", delivered)
    rep.figure("bare_received", bare_count)
    rep.figure("msgs_per_s", round(rate, 1))
    rep.figure("agent_cpu_pct", None if cpu_agent is None else round(cpu_agent * 100, 1))
    rep.figure("bare_cpu_pct", None if cpu_bare is None else round(cpu_bare * 100, 1))
    rep.figure("broker_cpu_pct", None if cpu_broker is None else round(cpu_broker * 100, 1))
    exact = None
    if expected is not None:
        from agent.sim.cloud import load_merged
        from devtools.truth import compare

        cmp = compare(expected, load_merged(receiver.db, GATEWAY_ID))
        exact = cmp.exact
        rep.figure("exact", exact)
    say(
        f"[footprint] {acked:,} messages acked by the broker ({rate:,.0f} msgs/s), "
        f"{delivered:,} counted at the receiver, bare subscriber got {bare_count:,}; "
        f"ground truth {'EXACT' if exact else 'not exact' if exact is False else 'n/a'}"
    )
    rep.row(
        f"Agent CPU at {rate:,.0f} msgs/s",
        "<= 10 % of one core and <= 0.35x bare aiomqtt",
        "n/a"
        if cpu_agent is None
        else f"{cpu_agent * 100:.1f} % (first half {_pct(cpu_a)}, second half {_pct(cpu_b)})",
        f"bare aiomqtt {_pct(cpu_bare)} (agent/bare {_x(ratio(cpu_agent, cpu_bare))}); broker "
        f"{_pct(cpu_broker)}",
        None
        if cpu_agent is None or cpu_bare is None
        else cpu_agent <= 0.10 and cpu_agent <= 0.35 * cpu_bare,
    )
    quarters = [sampler.rss_at("agent", t_pub0 + (t_pub1 - t_pub0) * q / 4) for q in (1, 2, 3, 4)]
    rep.figure(
        "agent_rss_mb_by_quarter", [None if q is None else round(q / 1024, 1) for q in quarters],
        "agent RSS at 1/4, 1/2, 3/4 and the end of the publishing: "
        + ", ".join("n/a" if q is None else f"{q / 1024:.1f} MB" for q in quarters),
    )  # fmt: skip
    rep.figure("agent_peak_rss_mb", round(hwm_kb / 1024, 1))
    rep.figure("agent_idle_rss_mb", round(idle_rss_kb / 1024, 1))
    rep.figure("bare_peak_rss_mb", round(bare_hwm_kb / 1024, 1))
    rep.row(
        f"Agent peak RSS, {CAMERAS} cameras",
        f"<= {PEAK_RSS_TARGET_MB} MB",
        f"{hwm_kb / 1024:.1f} MB (VmHWM)",
        f"bare aiomqtt {bare_hwm_kb / 1024:.1f} MB; agent idle before load "
        f"{idle_rss_kb / 1024:.1f} MB",
        hwm_kb / 1024 <= PEAK_RSS_TARGET_MB,
    )

    # SQLite writes.
    wb_pub = io_pub[1]["write_bytes"] - io0["write_bytes"]
    wb_all = io1["write_bytes"] - io0["write_bytes"] - log_growth
    cancelled = io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"]
    pub_s = io_pub[0] - t_pub0
    bodies = []
    for _, c in rows:
        c.pop("seq", None)
        bodies.append(msgspec.json.encode(c))
    chunk_bytes = sum(len(b) for b in bodies)
    wear = ratio(wb_all, chunk_bytes)
    wear_net = ratio(wb_all - cancelled, chunk_bytes)
    rep.figure("wear_net_of_cancelled", None if wear_net is None else round(wear_net, 2))
    chunk_rate = chunk_bytes / duration  # chunks are produced evenly while the cameras publish
    wr_a = sampler.write_rate_between("agent", *phase_a)
    wr_b = sampler.write_rate_between("agent", *phase_b)
    wear_a = ratio(wr_a, chunk_rate)
    wear_b = ratio(wr_b, chunk_rate)
    rep.figure("write_bytes_per_s_first_half", None if wr_a is None else round(wr_a))
    rep.figure("write_bytes_per_s_second_half", None if wr_b is None else round(wr_b))
    rep.figure("wear_first_half", None if wear_a is None else round(wear_a, 2))
    rep.figure("wear_second_half", None if wear_b is None else round(wear_b, 2))
    commits = (st1.get("outbox", {}).get("checkpoints", 0) or 0) - (
        st0.get("outbox", {}).get("checkpoints", 0) or 0
    )
    batches = (st1.get("forward", {}).get("batches_sent", 0) or 0) - (
        st0.get("forward", {}).get("batches_sent", 0) or 0
    )
    bodies_file = work / "bodies.msgpack"
    bodies_file.write_bytes(msgspec.msgpack.encode(bodies))
    base = json.loads(
        subprocess.run(
            bench_command(
                "footprint",
                "--sqlite-baseline",
                str(work / "baseline.sqlite3"),
                str(bodies_file),
                str(commits),
                str(batches),
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
    )
    base_wear = ratio(base["write_bytes"], chunk_bytes)
    rep.figure("sqlite_write_bytes_per_s", round(wb_pub / pub_s) if pub_s > 0 else None,
               f"agent write_bytes during publishing: {wb_pub:,} B in {pub_s:.1f} s = "
               f"{wb_pub / pub_s / 1024:,.0f} KiB/s")  # fmt: skip
    rep.figure("write_bytes_run", wb_all)
    rep.figure("cancelled_write_bytes_run", cancelled)
    rep.figure("log_bytes_excluded", log_growth)
    rep.figure("chunks", len(bodies))
    rep.figure("chunk_bytes", chunk_bytes)
    rep.figure("chunks_committed", (st1.get("outbox") or {}).get("chunks_committed"))
    rep.figure("snapshots_written", (st1.get("outbox") or {}).get("snapshots_written"))
    rep.figure("checkpoints", commits)
    rep.figure("batches_sent", batches)
    rep.figure("sqlite_baseline", base)
    fw = st1.get("forward") or {}
    if fw.get("chunks_sent"):
        rep.figure("wire_bytes_per_chunk_live", round(fw["bytes_sent"] / fw["chunks_sent"], 1))
    rep.row(
        "SQLite bytes written per second (3,000 msgs/s)",
        "(report)",
        (f"{wb_pub / pub_s / 1024:,.0f} KiB/s" if pub_s > 0 else "n/a")
        + f" (first half {_kib(wr_a)}, second half {_kib(wr_b)})",
        f"raw SQLite, same chunks and commit cadence: {base['write_bytes']:,} B for the whole "
        f"run vs the agent's {wb_all:,} B (agent/raw {_x(ratio(wb_all, base['write_bytes']))})",
        None,
    )
    rep.row(
        "Flash wear: SQLite write_bytes per byte of chunks",
        "<= 4",
        "n/a"
        if wear is None
        else f"{wear:.2f} over the run ({wb_all:,} B for {chunk_bytes:,} B of {len(bodies):,} "
        f"chunks); net of cancelled writes {_f(wear_net)}; by half of the publishing "
        f"{_f(wear_a)}, {_f(wear_b)}",
        "n/a"
        if base_wear is None
        else f"raw SQLite {base_wear:.2f} (agent/raw {_x(ratio(wear, base_wear))})",
        None if wear is None else wear <= 4,
    )
    if cancelled > 0.05 * wb_all:
        rep.note(
            f"{cancelled:,} B of the agent's write_bytes were cancelled (cancelled_write_bytes: "
            "pages dirtied then truncated or deleted before writeback, e.g. SQLite temp files); "
            f"net of them the wear ratio is {_f(wear_net)}"
        )

    # Delay.
    steady_until = pub_end_wall - (WINDOW_S + LATENESS_S) - 0.5
    oldest, newest, oldest_all = [], [], []
    for received_at, c in rows:
        w = int(c.get("count", 0))
        if c.get("rev", 0) != 0:
            continue
        d_old = received_at - float(c["event_first"])
        d_new = received_at - float(c["event_last"])
        oldest_all.append((d_old, w))
        if (
            float(c["t"]) + float(c.get("width_s", 1)) <= steady_until
            and c["t"] >= pub_start_wall + 1
        ):
            oldest.append((d_old, w))
            newest.append((d_new, w))
    p50_hi, p99_hi = weighted_percentile(oldest, 50), weighted_percentile(oldest, 99)
    p50_lo, p99_lo = weighted_percentile(newest, 50), weighted_percentile(newest, 99)
    p99_all = weighted_percentile(oldest_all, 99)
    target = WINDOW_S + LATENESS_S + 1.0
    floor = WINDOW_S + LATENESS_S + CHECKPOINT_S + LINGER_S
    for k, v in (("delay_p50_upper_s", p50_hi), ("delay_p99_upper_s", p99_hi),
                 ("delay_p50_lower_s", p50_lo), ("delay_p99_lower_s", p99_lo),
                 ("delay_p99_upper_incl_end_of_run_s", p99_all)):  # fmt: skip
        rep.figure(k, None if v is None else round(v, 3))
    rep.row(
        "Publish -> receiver delay p50 / p99 (per message)",
        f"p99 <= window + lateness + 1 s = {target:g} s",
        f"p50 {_s(p50_hi)} / p99 {_s(p99_hi)} (upper bound: oldest message of each chunk); "
        f"lower bound p50 {_s(p50_lo)} / p99 {_s(p99_lo)}",
        f"design floor window + lateness + checkpoint + linger = {floor:g} s (worst message)",
        None if p99_hi is None else p99_hi <= target,
    )
    rep.note(
        f"delay percentiles are over {sum(w for _, w in oldest):,} messages in windows closed "
        f"while the cameras were publishing (steady state); including the last windows of the "
        f"run, which close only after idle_close_s = {IDLE_CLOSE_S:g} s of silence, p99 (upper) "
        f"is {_s(p99_all)}"
    )
    rep.note(
        "flash wear = agent write_bytes from just before the first message to the outbox "
        "drained (after the last delete), minus the growth of its log file, over the bytes of "
        "chunk JSON produced (receiver's stored chunks re-encoded as the agent stores them: "
        "msgspec, without seq); write_bytes counts pages dirtied (4 KiB granularity), so a WAL "
        "frame appended after each fsync'd commit costs at least a page"
    )
    rep.note(
        f"agent counters: {commits} checkpoints, {batches} batches sent, snapshots (ack "
        f"pressure) {(st1.get('outbox') or {}).get('snapshots_written')}"
    )
    rep.finish(args.json_out)
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f} %"


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _kib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1024:,.0f} KiB/s"


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
