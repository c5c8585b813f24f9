"""Flash wear per buffer.durability mode (issue #24): bytes the agent writes to its disk at 300
cameras x 10 msgs/s, from /proc/<pid>/io (write_bytes: what reached the block layer, the
outbox, its WAL and their fsyncs), per mode, in one run so both face the same machine.

    python -m bench.flash_wear [--seconds 60] [--rounds 2] [--json-out bench/out/wear.json]

Each round starts a private Mosquitto, the reference receiver and the agent with the shipped
defaults but the mode; the load is bench.loadgen. The first 10 s (start, first windows) are
not counted.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Agent,
    LoadThread,
    Mosquitto,
    ProcStat,
    Receiver,
    agent_config,
    dig,
    free_port,
    parser,
    write_json,
)
from bench.loadgen import LoadOptions, run_load

WARMUP_S = 10.0


def measure(mode: str, seconds: float, rate: float, cameras: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="wear-") as d:
        tmp = Path(d)
        mq = Mosquitto(tmp / "mq").start()
        rc = Receiver(tmp / "cloud").start()
        buf = tmp / "agent" / "buffer.sqlite3"
        buf.parent.mkdir()
        health = free_port()
        cfg = agent_config(
            path=tmp / "agent.toml", gateway_id="gw-wear", mqtt_port=mq.port,
            receiver_url=rc.url, buffer_path=buf, health_port=health,
            overrides={"buffer": {"durability": mode, "synchronous": "full"}},
        )  # fmt: skip
        agent = Agent(cfg, tmp / "agent.log", health)
        agent.start()
        try:
            agent.wait_ready(timeout_s=30)
            assert agent.popen is not None
            proc = ProcStat(agent.popen.pid)
            load = LoadThread(lambda: run_load(LoadOptions(
                port=mq.port, cameras=cameras, rate=rate, duration_s=seconds + WARMUP_S,
                processes=1)))  # fmt: skip
            load.start()
            time.sleep(WARMUP_S)
            io0, t0, ob0 = proc.io(), time.monotonic(), dig(agent.status(), "outbox") or {}
            time.sleep(seconds)
            io1, t1, ob1 = proc.io(), time.monotonic(), dig(agent.status(), "outbox") or {}
            load.join(timeout=seconds + 60)
            elapsed = t1 - t0

            def per_s(a: dict[str, Any], b: dict[str, Any], key: str) -> int:
                return round(float(b.get(key, 0) - a.get(key, 0)) / elapsed)

            return {
                "mode": mode, "seconds": round(elapsed, 1),
                "write_bytes_per_s": per_s(io0, io1, "write_bytes"),
                "write_calls_per_s": per_s(io0, io1, "syscw"),
                "snapshots_per_s": per_s(ob0, ob1, "snapshots_written"),
                "chunks_per_s": per_s(ob0, ob1, "chunks_committed"),
                "published": load.result.get("acked"),
            }  # fmt: skip
        finally:
            agent.stop()
            rc.stop()
            mq.stop()


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "", quick=False)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rate", type=float, default=3000.0)
    p.add_argument("--cameras", type=int, default=300)
    a = p.parse_args(argv)
    rows = []
    for r in range(a.rounds):
        for mode in ("window", "message"):
            row = {**measure(mode, a.seconds, a.rate, a.cameras), "round": r + 1}
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_json(a.json_out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
