"""Flash wear per buffer.durability mode (issue #24): bytes the agent writes to its disk at 300
cameras x 10 msgs/s, from /proc/<pid>/io (write_bytes: what reached the block layer, the
outbox, its WAL and their fsyncs), per mode, in one run so both face the same machine.

    python -m bench.flash_wear [--seconds 60] [--rounds 2] [--json-out bench/out/wear.json]

Each round starts a private Mosquitto, the reference receiver and the agent with the shipped
defaults but the mode; the load is bench.loadgen. The first 10 s (start, first windows) are
not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import LoadOptions, run_load
from devtools.procs import Agent, Mosquitto, Receiver, agent_config, free_port

WARMUP_S = 10.0


def _io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v)
    return out


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
            pid = agent.popen.pid
            import threading

            result: dict[str, Any] = {}

            def load() -> None:
                result.update(run_load(LoadOptions(
                    port=mq.port, cameras=cameras, rate=rate, duration_s=seconds + WARMUP_S,
                    processes=1,
                )))  # fmt: skip

            t = threading.Thread(target=load)
            t.start()
            time.sleep(WARMUP_S)
            start, t0 = _io(pid), time.monotonic()
            snap0 = (agent.status() or {}).get("outbox", {})
            time.sleep(seconds)
            end, t1 = _io(pid), time.monotonic()
            snap1 = (agent.status() or {}).get("outbox", {})
            t.join(timeout=seconds + 60)
            elapsed = t1 - t0
            return {
                "mode": mode,
                "seconds": round(elapsed, 1),
                "write_bytes_per_s": round((end["write_bytes"] - start["write_bytes"]) / elapsed),
                "write_calls_per_s": round((end["syscw"] - start["syscw"]) / elapsed),
                "snapshots_per_s": round(
                    (snap1.get("snapshots_written", 0) - snap0.get("snapshots_written", 0))
                    / elapsed
                ),
                "chunks_per_s": round(
                    (snap1.get("chunks_committed", 0) - snap0.get("chunks_committed", 0)) / elapsed
                ),
                "published": result.get("acked"),
            }
        finally:
            agent.stop()
            rc.stop()
            mq.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rate", type=float, default=3000.0)
    p.add_argument("--cameras", type=int, default=300)
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    rows = []
    for r in range(a.rounds):
        for mode in ("window", "message"):
            row = measure(mode, a.seconds, a.rate, a.cameras)
            row["round"] = r + 1
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
