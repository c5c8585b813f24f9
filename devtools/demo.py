"""`make demo`: a private Mosquitto, the reference receiver, simulated cameras and the agent.

The cloud goes down in the middle of the run; at the end the receiver's table is compared with
every message the cameras published.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from agent.sim.cloud import load_merged
from devtools.procs import (
    Agent,
    Mosquitto,
    Publisher,
    Receiver,
    agent_config,
    free_port,
    wait_for,
)
from devtools.truth import compare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.demo")
    p.add_argument("--cameras", type=int, default=200)
    p.add_argument("--rate", type=float, default=5.0, help="messages/s per camera")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of publishing")
    p.add_argument("--outage-at", type=float, default=8.0, help="cloud goes down after (s)")
    p.add_argument("--outage-for", type=float, default=8.0, help="...for this long (s)")
    p.add_argument("--dir", default="demo-run")
    args = p.parse_args(argv)

    work = Path(args.dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"demo: working in {work}")
    broker = Mosquitto(work / "mosquitto").start()
    receiver = Receiver(work / "cloud").start()
    health_port = free_port()
    config = agent_config(
        path=work / "agent.toml",
        gateway_id="demo-gw-1",
        mqtt_port=broker.port,
        receiver_url=receiver.url,
        buffer_path=work / "agent" / "buffer.sqlite3",
        client_id="edge-agent-demo",
        health_port=health_port,
    )
    agent = Agent(config, work / "agent.log", health_port).start()
    print(
        f"demo: mosquitto on 127.0.0.1:{broker.port}, receiver on 127.0.0.1:{receiver.port}, "
        f"agent /status on http://127.0.0.1:{health_port}/status (logs in {work})"
    )
    try:
        agent.wait_ready()
        return _run(args, work, broker, receiver, agent)
    finally:
        agent.stop()
        receiver.stop()
        broker.stop()


def _run(
    args: argparse.Namespace, work: Path, broker: Mosquitto, receiver: Receiver, agent: Agent
) -> int:
    total = int(args.cameras * args.rate * args.duration)
    print(
        f"demo: {args.cameras} cameras x {args.rate:g} msgs/s for {args.duration:g} s "
        f"(~{total} messages); the cloud goes down at {args.outage_at:g} s "
        f"for {args.outage_for:g} s"
    )
    pub = Publisher(
        broker, work, cameras=args.cameras, rate=args.rate, duration_s=args.duration, seed=7
    ).start()
    started = time.monotonic()
    down = up = False
    while pub.running:
        elapsed = time.monotonic() - started
        if not down and elapsed >= args.outage_at:
            receiver.kill()
            down = True
            print(f"demo: {elapsed:5.1f} s  -- cloud DOWN (receiver killed) --")
        elif down and not up and elapsed >= args.outage_at + args.outage_for:
            receiver.start()
            up = True
            print(f"demo: {elapsed:5.1f} s  -- cloud UP again --")
        _progress(elapsed, agent, receiver if (not down or up) else None)
        pub.wait(2.0)
    if down and not up:
        receiver.start()
    expected = pub.join()
    want = sum(e.count for e in expected.values())
    print(f"demo: publishing done; waiting for the backlog to reach the cloud ({want} messages)")
    try:
        wait_for(lambda: receiver.messages() >= want, timeout_s=120, what="the backlog")
    except TimeoutError as e:
        print(f"demo: {e}")
    _progress(time.monotonic() - started, agent, receiver)
    agent.stop()
    result = compare(expected, load_merged(receiver.db))
    stats = receiver.stats()
    gw = stats["gateways"].get("demo-gw-1", {})
    print("\n=== summary ===")
    print(f"messages published (acked by broker): {pub.summary['acked']}")
    print(f"messages counted in the cloud:        {result.received_messages}")
    print(f"chunks received by the cloud:         {stats['chunks']} (rows: {stats['merged_rows']})")
    print(f"batches accepted by the cloud:        {gw.get('batches')}")
    print(
        f"seq gaps: {gw.get('gaps')}, out-of-order seqs: {gw.get('out_of_order')}, "
        f"duplicate seqs (deduplicated by the cloud): {gw.get('duplicates')}"
    )
    print(f"missing messages:    {result.missing}")
    print(f"duplicated messages: {result.duplicated}")
    if result.exact:
        print("RESULT: every published message was counted exactly once.")
        return 0
    print("RESULT: MISMATCH")
    for line in result.mismatched_rows[:10]:
        print("  " + line)
    return 1


def _progress(elapsed: float, agent: Agent, receiver: Receiver | None) -> None:
    s = agent.status() or {}
    ingest, outbox, fwd = s.get("ingest", {}), s.get("outbox", {}), s.get("forward", {})
    cloud = f"{receiver.messages()} messages" if receiver is not None else "DOWN"
    print(
        f"demo: {elapsed:5.1f} s  agent counted {ingest.get('counted', 0):>7}  "
        f"outbox {outbox.get('chunks', 0):>6} chunks  sent {fwd.get('chunks_sent', 0):>7} chunks  "
        f"cloud: {cloud}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
