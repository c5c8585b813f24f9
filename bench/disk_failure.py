"""A failing disk for minutes (issue #24): RSS and readiness of the agent while every write and
fsync of its outbox directory fails with EIO (tests/faultdisk.py, an LD_PRELOAD shim), under
300 cameras x 10 msgs/s, then the disk heals: is every acknowledged message delivered once?

    python -m bench.disk_failure [--fail-s 300] [--rate 3000] [--out bench/DISK_FAILURE.md]

The agent runs the shipped defaults (buffer.durability = "message", mqtt.receive_maximum =
65535) under the unit's MemoryMax=256M in mind: the figure is its peak RSS against that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ProcStat, machine_description
from bench.loadgen import LoadOptions, run_load
from devtools.procs import Agent, Mosquitto, Receiver, agent_config, free_port, wait_for
from tests.faultdisk import FailingDisk
from tests.helpers import wait_quiet

UNIT_LIMIT_MB = 256
WARMUP_S = 20.0
HEAL_S = 40.0
SAMPLE_S = 1.0


def run(fail_s: float, rate: float, cameras: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="diskfail-") as d:
        tmp = Path(d)
        mq = Mosquitto(tmp / "mq").start()
        rc = Receiver(tmp / "cloud").start()
        buf = tmp / "agent" / "buffer.sqlite3"
        buf.parent.mkdir()
        disk = FailingDisk(buf.parent, tmp)
        health = free_port()
        cfg = agent_config(
            path=tmp / "agent.toml", gateway_id="gw-diskfail", mqtt_port=mq.port,
            receiver_url=rc.url, buffer_path=buf, health_port=health,
        )  # fmt: skip
        agent = Agent(cfg, tmp / "agent.log", health)
        agent._env = {**os.environ, **disk.env()}
        agent.start()
        try:
            agent.wait_ready(timeout_s=60)
            assert agent.popen is not None
            proc = ProcStat(agent.popen.pid)
            total_s = WARMUP_S + fail_s + HEAL_S
            result: dict[str, Any] = {}
            loader = threading.Thread(target=lambda: result.update(run_load(LoadOptions(
                port=mq.port, cameras=cameras, rate=rate, duration_s=total_s, processes=1,
            ))))  # fmt: skip
            t0 = time.monotonic()
            loader.start()
            samples: list[dict[str, Any]] = []
            reported_after: float | None = None
            failing_from = t0 + WARMUP_S
            healed_at = failing_from + fail_s
            failing = False
            while time.monotonic() < t0 + total_s + 5:
                now = time.monotonic()
                if not failing and now >= failing_from and now < healed_at:
                    disk.control.touch()
                    failing = True
                elif failing and now >= healed_at:
                    disk.control.unlink(missing_ok=True)
                    failing = False
                st = agent.status() or {}
                problems = st.get("problems", [])
                if (
                    failing
                    and reported_after is None
                    and any("outbox writes failing" in p for p in problems)
                ):
                    reported_after = round(now - failing_from, 1)
                samples.append({
                    "t_s": round(now - t0, 1), "rss_mb": round(proc.rss_kb() / 1024, 1),
                    "failing": failing, "paused": st.get("ingest", {}).get("paused"),
                    "unacked": st.get("ingest", {}).get("unacked"), "ready": st.get("ready"),
                })  # fmt: skip
                time.sleep(SAMPLE_S - (time.monotonic() - now) % SAMPLE_S)
            disk.control.unlink(missing_ok=True)
            loader.join(timeout=120)
            published = int(result.get("acked", 0))
            wait_for(lambda: rc.messages() >= published, timeout_s=300,
                     what="every message at the receiver")  # fmt: skip
            wait_quiet(rc, 5.0, timeout_s=120)
            delivered = rc.messages()
            return {
                "fail_s": fail_s, "rate": rate, "cameras": cameras, "published": published,
                "delivered": delivered, "exact": delivered == published,
                "peak_rss_mb": round(proc.hwm_kb() / 1024, 1),
                "rss_before_failure_mb": next(
                    (s["rss_mb"] for s in reversed(samples) if s["t_s"] < WARMUP_S), None
                ),
                "reported_after_s": reported_after, "samples": samples,
                "receiver": rc.stats(),
            }  # fmt: skip
        finally:
            disk.control.unlink(missing_ok=True)
            agent.stop()
            rc.stop()
            mq.stop()


def report(r: dict[str, Any], argv: list[str]) -> str:
    m = machine_description()
    lines = [
        "# A failing disk for minutes (issue #24)",
        "",
        f"`python -m bench.disk_failure {' '.join(argv)}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {m.get('nproc', '?')} x "
        f"{m.get('cpu_model', '?')}, Python {sys.version.split()[0]}.",
        "",
        f"Load {r['cameras']} cameras, {r['rate']:,.0f} msgs/s in all; after {WARMUP_S:.0f} s "
        "every write and fsync under the outbox's directory fails with EIO for "
        f"{r['fail_s']:.0f} s, then the disk heals and the load goes on for {HEAL_S:.0f} s. "
        "The agent runs the shipped defaults.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| published (acked to the cameras) | {r['published']:,} |",
        f"| delivered to the receiver | {r['delivered']:,} ({'exact' if r['exact'] else 'NOT exact'}) |",  # noqa: E501
        f"| RSS before the failure | {r['rss_before_failure_mb']} MB |",
        f"| peak RSS (VmHWM) | **{r['peak_rss_mb']} MB** (the unit's MemoryMax: {UNIT_LIMIT_MB} MB) |",  # noqa: E501
        f"| `/readyz` says 'outbox writes failing' after | {r['reported_after_s']} s |",
        "",
        "RSS, readiness and the intake every 30 s:",
        "",
        "| t (s) | disk | RSS (MB) | unacked | intake paused | ready |",
        "|---:|---|---:|---:|---|---|",
    ]
    last = -30.0
    for s in r["samples"]:
        if s["t_s"] - last >= 30 or s is r["samples"][-1]:
            last = s["t_s"]
            lines.append(
                f"| {s['t_s']:.0f} | {'failing' if s['failing'] else 'ok'} | {s['rss_mb']} | "
                f"{s['unacked']} | {s['paused']} | {s['ready']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fail-s", type=float, default=300.0)
    p.add_argument("--rate", type=float, default=3000.0)
    p.add_argument("--cameras", type=int, default=300)
    p.add_argument("--out")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    r = run(a.fail_s, a.rate, a.cameras)
    print(json.dumps({k: v for k, v in r.items() if k != "samples"}, indent=1))
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(r, indent=1) + "\n")
    if a.out:
        Path(a.out).write_text(report(r, argv))
    return 0 if r["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
