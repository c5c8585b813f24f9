"""Flash wear per buffer.durability mode (issue #24): bytes the agent writes to its disk at 300
cameras x 10 msgs/s, from /proc/<pid>/io (write_bytes: what reached the block layer, the
outbox, its WAL and their fsyncs), per mode, in one run so both face the same machine.

    python -m bench.flash_wear [--seconds 60] [--rounds 2] [--json-out bench/out/wear.json]

Each round starts a private Mosquitto, the reference receiver and the agent (devtools' test
config with the mode and synchronous = "full"); the load is bench.loadgen. The first 10 s
(start, first windows) are not counted.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import LoadThread, ProcStat, dig, parser, pid, site, write_json
from bench.loadgen import LoadOptions, run_load

WARMUP_S = 10.0


def measure(mode: str, seconds: float, rate: float, cameras: int) -> dict[str, Any]:
    buffer = {"durability": mode, "synchronous": "full"}
    with (
        tempfile.TemporaryDirectory(prefix="wear-") as d,
        site(Path(d), test_config=True, gateway_id="gw-wear", buffer=buffer) as (broker, _, agent),
    ):
        proc = ProcStat(pid(agent))
        load = LoadThread(lambda: run_load(LoadOptions(
            port=broker.port, cameras=cameras, rate=rate, duration_s=seconds + WARMUP_S,
            processes=1)))  # fmt: skip
        load.start()
        time.sleep(WARMUP_S)
        io0, t0, ob0 = proc.io(), time.monotonic(), dig(agent.status(), "outbox") or {}
        time.sleep(seconds)
        io1, t1, ob1 = proc.io(), time.monotonic(), dig(agent.status(), "outbox") or {}
        load.join(timeout=seconds + 60)

        def per_s(a: dict[str, Any], b: dict[str, Any], key: str) -> int:
            return round(float(b.get(key, 0) - a.get(key, 0)) / (t1 - t0))

        return {
            "mode": mode, "seconds": round(t1 - t0, 1),
            "write_bytes_per_s": per_s(io0, io1, "write_bytes"),
            "write_calls_per_s": per_s(io0, io1, "syscw"),
            "snapshots_per_s": per_s(ob0, ob1, "snapshots_written"),
            "chunks_per_s": per_s(ob0, ob1, "chunks_committed"),
            "published": load.result.get("acked"),
        }  # fmt: skip


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
            rows.append({**measure(mode, a.seconds, a.rate, a.cameras), "round": r + 1})
            print(json.dumps(rows[-1]), flush=True)
    write_json(a.json_out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
