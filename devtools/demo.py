"""`make demo`: the whole path. Simulated cameras -> a private Mosquitto -> the agent ->
edge-ingest -> a private PostgreSQL cluster.

In the middle of the run the ingest service is SIGKILLed and comes back later, and PostgreSQL
crashes and recovers; at the end the database's views are compared with every message the
cameras published.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import sys
import time
from pathlib import Path

import asyncpg
from edge_ingest.schema import migrate

from devtools.gateways import Ingest, gateway_row, load_views
from devtools.postgres import PostgresCluster
from devtools.procs import Agent, Mosquitto, Publisher, agent_config, free_port, wait_for
from devtools.truth import compare

GATEWAY = "demo-gw-1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.demo")
    p.add_argument("--cameras", type=int, default=200)
    p.add_argument("--rate", type=float, default=5.0, help="messages/s per camera")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of publishing")
    p.add_argument("--outage-at", type=float, default=8.0, help="edge-ingest killed after (s)")
    p.add_argument("--outage-for", type=float, default=8.0, help="...down for this long (s)")
    p.add_argument("--db-crash-at", type=float, default=22.0, help="PostgreSQL crashes at (s)")
    p.add_argument("--dir", default="demo-run")
    args = p.parse_args(argv)

    work = Path(args.dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"demo: working in {work}")
    broker = Mosquitto(work / "mosquitto").start()
    pg = PostgresCluster.create(work / "postgres").start()
    dsn = pg.dsn()
    print(f"demo: PostgreSQL {pg.port}: {asyncio.run(_migrate(dsn))}")
    ingest = Ingest(work / "ingest", dsn, token="demo-token").start()
    token_file = work / "agent-token"
    token_file.write_text("demo-token\n")
    health_port = free_port()
    config = agent_config(
        path=work / "agent.toml",
        gateway_id=GATEWAY,
        mqtt_port=broker.port,
        receiver_url=ingest.url,
        buffer_path=work / "agent" / "buffer.sqlite3",
        client_id="edge-agent-demo",
        health_port=health_port,
        overrides={"forward": {"token_file": str(token_file)}},
    )
    agent = Agent(config, work / "agent.log", health_port).start()
    print(
        f"demo: mosquitto on 127.0.0.1:{broker.port}, edge-ingest on 127.0.0.1:{ingest.port}, "
        f"PostgreSQL on 127.0.0.1:{pg.port} ({dsn}),\n"
        f"      agent /status on http://127.0.0.1:{health_port}/status (logs in {work})"
    )
    try:
        agent.wait_ready()
        return _run(args, work, broker, ingest, pg, agent)
    finally:
        agent.stop()
        ingest.stop()
        pg.close()
        broker.stop()


async def _migrate(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn, today=dt.datetime.now(dt.UTC).date())
    finally:
        await conn.close()


async def _busiest(dsn: str) -> list[tuple[dt.datetime, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT minute, sum(count)::bigint AS n FROM edge_ingest.per_minute"
            " WHERE gateway = $1 GROUP BY minute ORDER BY n DESC LIMIT 3",
            GATEWAY,
        )
        return [(r["minute"].astimezone(dt.UTC), r["n"]) for r in rows]
    finally:
        await conn.close()


def _messages(dsn: str) -> int:
    return int(gateway_row(dsn, GATEWAY).get("messages", 0))


def _run(
    args: argparse.Namespace,
    work: Path,
    broker: Mosquitto,
    ingest: Ingest,
    pg: PostgresCluster,
    agent: Agent,
) -> int:
    dsn = pg.dsn()
    total = int(args.cameras * args.rate * args.duration)
    print(
        f"demo: {args.cameras} cameras x {args.rate:g} msgs/s for {args.duration:g} s "
        f"(~{total} messages); edge-ingest is killed at {args.outage_at:g} s for "
        f"{args.outage_for:g} s; PostgreSQL crashes at {args.db_crash_at:g} s"
    )
    pub = Publisher(
        broker, work, cameras=args.cameras, rate=args.rate, duration_s=args.duration, seed=7
    ).start()
    started = time.monotonic()
    down = up = crashed = False
    while pub.running:
        elapsed = time.monotonic() - started
        if not down and elapsed >= args.outage_at:
            ingest.kill()
            down = True
            print(f"demo: {elapsed:5.1f} s  -- cloud DOWN (edge-ingest SIGKILLed) --")
        elif down and not up and elapsed >= args.outage_at + args.outage_for:
            ingest.start()
            up = True
            print(f"demo: {elapsed:5.1f} s  -- cloud UP again --")
        elif up and not crashed and elapsed >= args.db_crash_at:
            pg.kill()
            print(f"demo: {elapsed:5.1f} s  -- PostgreSQL SIGKILLed (edge-ingest answers 503) --")
            pg.start()
            crashed = True
            print(f"demo: {time.monotonic() - started:5.1f} s  -- PostgreSQL recovered --")
        _progress(elapsed, agent, dsn if (not down or up) else None)
        pub.wait(2.0)
    if down and not up:
        ingest.start()
    expected = pub.join()
    want = sum(e.count for e in expected.values())
    print(f"demo: publishing done; waiting for the backlog to reach the database ({want} messages)")
    try:
        wait_for(lambda: _messages(dsn) >= want, timeout_s=120, what="the backlog")
    except TimeoutError as e:
        print(f"demo: {e}")
    _progress(time.monotonic() - started, agent, dsn)
    agent.stop()
    result = compare(expected, load_views(dsn, GATEWAY))
    gw = gateway_row(dsn, GATEWAY)
    print("\n=== summary (from PostgreSQL: edge_ingest.per_second*, edge_ingest.gateways) ===")
    print(f"messages published (acked by broker): {pub.summary['acked']}")
    print(f"messages counted in the database:     {result.received_messages}")
    print(f"chunks merged by edge-ingest:         {gw.get('chunks')}")
    print(f"batches applied:                      {gw.get('batches')}")
    print(
        f"replays recognised (applied nothing): {gw.get('replays')}, seq gaps: {gw.get('gaps')}, "
        f"refused: {gw.get('refused')}"
    )
    unavailable = sum(
        ingest.metric("edge_ingest_unavailable_total", f'cause="{c}"')
        for c in ("database_down", "pool_timeout", "statement_timeout", "resources")
    )
    print(f"503 answers (since the last restart): {unavailable:.0f}")
    print(f"missing messages:    {result.missing}")
    print(f"duplicated messages: {result.duplicated}")
    print("busiest minutes (SELECT minute, sum(count) FROM edge_ingest.per_minute ...):")
    for minute, count in asyncio.run(_busiest(dsn)):
        print(f"  {minute:%Y-%m-%d %H:%M} UTC  {count:>7} messages")
    if result.exact:
        print("RESULT: every published message was counted exactly once.")
        return 0
    print("RESULT: MISMATCH")
    for line in result.mismatched_rows[:10]:
        print("  " + line)
    return 1


def _progress(elapsed: float, agent: Agent, dsn: str | None) -> None:
    s = agent.status() or {}
    ingest, outbox, fwd = s.get("ingest", {}), s.get("outbox", {}), s.get("forward", {})
    try:
        cloud = f"{_messages(dsn)} messages" if dsn is not None else "DOWN"
    except (OSError, asyncpg.PostgresError):
        cloud = "database restarting"
    print(
        f"demo: {elapsed:5.1f} s  agent counted {ingest.get('counted', 0):>7}  "
        f"outbox {outbox.get('chunks', 0):>6} chunks  sent {fwd.get('chunks_sent', 0):>7} chunks  "
        f"database: {cloud}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
