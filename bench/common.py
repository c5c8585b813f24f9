"""Shared helpers for the benchmarks: /proc readings, machine noise, baseline consumers, output.

Process startup (Mosquitto, the reference receiver, the agent) is agent.sim.procs; this module
only adds what benchmarks need on top: an agent config with the shipped defaults, the two
baseline subscribers (bare aiomqtt, mosquitto_sub), /proc sampling and the figure output that
bench.run_all collects.

Every script is a module run from the repository root (`python -m bench.<name>`); a script that
starts another as a child process builds the command with bench_command() and starts it with
cwd=ROOT (or env=child_env() where the cwd cannot be set), so it works from anywhere.
Every script writes its working files under bench/out/<script>/ (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from devtools.procs import (
    HOST,
    Agent,
    Mosquitto,
    Receiver,
    free_port,
    mosquitto_binary,
    terminate,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"

__all__ = [
    "HOST",
    "OUT",
    "ROOT",
    "Agent",
    "Mosquitto",
    "Receiver",
    "free_port",
    "wait_for",
]  # fmt: skip

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- child processes --------------------------------------------------------------------------


def bench_command(name: str, *args: str) -> list[str]:
    """`python -m bench.<name> args...` with this interpreter. Start it with cwd=ROOT, or with
    env=child_env() where the cwd cannot be chosen, so `bench` is importable in the child."""
    return [sys.executable, "-m", f"bench.{name}", *args]


def child_env() -> dict[str, str]:
    """This process's environment with the repository root first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


# -- arguments and output ---------------------------------------------------------------------


def prog() -> str | None:
    """`python -m bench.<name>` for the usage line (argparse would show `<name>.py`)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return f"python -m {spec.name}" if spec is not None else None


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(), description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short durations (smoke run)")
    p.add_argument("--json-out", type=Path, help="also write the figures here (for run_all)")
    return p


def fresh_dir(name: str) -> Path:
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def say(msg: str) -> None:
    print(msg, flush=True)


class Report:
    """The figures of one script: printed as they come, written as JSON at the end.

    rows: what the issue asks for — (figure, target, measured, baseline, verdict) — for the
    RESULTS.md table; figures: every number, flat; notes: how it was measured, caveats.
    """

    def __init__(self, name: str, quick: bool) -> None:
        self.name = name
        self.mode = "quick" if quick else "full"
        self.rows: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []
        self.started = time.time()
        self.load = MachineLoad()
        self.agent_commit = machine_description().get("agent_commit")
        self.calibration_start = calibrate()
        say(f"[{name}] mode {self.mode}; machine calibration {self.calibration_start:,.0f} ops/s")

    def figure(self, key: str, value: Any, text: str | None = None) -> None:
        self.figures[key] = value
        if text is not None:
            say(f"[{self.name}] {text}")

    def row(
        self,
        figure: str,
        target: str,
        measured: str,
        baseline: str,
        ok: bool | None,
    ) -> None:
        self.rows.append(
            {"figure": figure, "target": target, "measured": measured, "baseline": baseline,
             "ok": ok}
        )  # fmt: skip
        verdict = {True: "MEETS", False: "MISSES", None: "n/a"}[ok]
        say(f"[{self.name}] {figure}: {measured} (target {target}; baseline {baseline}) {verdict}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"[{self.name}] note: {text}")

    def finish(self, json_out: Path | None) -> dict[str, Any]:
        calibration_end = calibrate()
        busy, steal = self.load.read()
        doc = {
            "name": self.name,
            "mode": self.mode,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "rows": self.rows,
            "figures": self.figures,
            "notes": self.notes,
            "agent_commit_at_start": self.agent_commit,
            "agent_commit_at_end": machine_description().get("agent_commit"),
            "noise": {
                "calibration_start_ops_s": round(self.calibration_start),
                "calibration_end_ops_s": round(calibration_end),
                "machine_busy_pct": round(busy, 1),
                "machine_steal_pct": round(steal, 1),
                "loadavg_end": os.getloadavg()[0],
            },
        }
        say(
            f"[{self.name}] done in {doc['seconds']} s; machine busy {busy:.0f}% of all cores "
            f"(steal {steal:.1f}%) during the run; calibration {self.calibration_start:,.0f} -> "
            f"{calibration_end:,.0f} ops/s"
        )
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(doc, indent=2, default=str))
        return doc


# -- machine noise ----------------------------------------------------------------------------


def calibrate(seconds: float = 0.3) -> float:
    """A fixed pure-Python reference workload (dict/str/json work like the agent's): ops/s.

    Run at the start and end of every script: a drop means the shared machine got slower while
    the benchmark ran, which is the reason every figure has a same-run baseline.
    """
    doc = {"ts": 1764126000.123, "cls": "person", "conf": 0.87, "frame": 12}
    n = 0
    end = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < end:
        for _ in range(200):
            s = json.dumps(doc, separators=(",", ":"))
            d = json.loads(s)
            d["frame"] += 1
            n += 1
    return n / (time.perf_counter() - started)


class MachineLoad:
    """Whole-machine busy and steal percentages between construction and read() (/proc/stat)."""

    def __init__(self) -> None:
        self._t0 = self._sample()

    @staticmethod
    def _sample() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    def read(self) -> tuple[float, float]:
        t1 = self._sample()
        d = [b - a for a, b in zip(self._t0, t1, strict=False)]
        total = sum(d[:8]) or 1  # user nice system idle iowait irq softirq steal
        idle = d[3] + d[4]
        steal = d[7] if len(d) > 7 else 0
        return 100.0 * (total - idle) / total, 100.0 * steal / total


def machine_description() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    try:
        out = subprocess.run(
            [mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5
        ).stdout
        mosq = out.splitlines()[0].strip() if out else "?"
    except (OSError, FileNotFoundError, subprocess.SubprocessError):
        mosq = "not found"
    fs = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        df = subprocess.run(
            ["df", "--output=fstype,source", str(OUT.parent)], capture_output=True, text=True,
            timeout=5,
        ).stdout.split()  # fmt: skip
        fs = " on ".join(df[-2:]) if len(df) >= 4 else "?"
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        # Read-only git queries: which agent code was measured.
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "agent"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        commit = head + (" + uncommitted changes in agent/" if dirty else "")
    return {
        "agent_commit": commit,
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": mosq,
        "filesystem": fs,
        "loadavg": os.getloadavg(),
    }


# -- /proc readings for one process -----------------------------------------------------------


class ProcStat:
    """CPU seconds, RSS, peak RSS (VmHWM) and I/O counters of one pid, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def rss_kb(self) -> int:
        return self._status("VmRSS")

    def hwm_kb(self) -> int:
        return self._status("VmHWM")

    def io(self) -> dict[str, int]:
        with open(f"/proc/{self.pid}/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f)}


class Sampler(threading.Thread):
    """Samples processes every `interval_s`: max RSS seen, and a timeline of CPU seconds."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.stats = {k: ProcStat(p) for k, p in pids.items()}
        self.interval_s = interval_s
        self.max_rss_kb = dict.fromkeys(pids, 0)
        self.timeline: list[tuple[float, dict[str, float]]] = []
        self.rss_timeline: list[tuple[float, dict[str, int]]] = []
        self.wb_timeline: list[tuple[float, dict[str, int]]] = []  # /proc/PID/io write_bytes
        self._stop_ev = threading.Event()

    def run(self) -> None:
        while not self._stop_ev.is_set():
            now = time.monotonic()
            cpu, rss, wb = {}, {}, {}
            for k, st in self.stats.items():
                with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
                    rss[k] = st.rss_kb()
                    self.max_rss_kb[k] = max(self.max_rss_kb[k], rss[k])
                    cpu[k] = st.cpu_s()
                    wb[k] = st.io()["write_bytes"]
            self.timeline.append((now, cpu))
            self.rss_timeline.append((now, rss))
            self.wb_timeline.append((now, wb))
            self._stop_ev.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(timeout=2)

    def rss_at(self, key: str, t: float) -> int | None:
        """RSS (KiB) of `key` at the last sample taken at or before monotonic time t."""
        best = None
        for ts, rss in self.rss_timeline:
            if ts > t:
                break
            best = rss.get(key, best)
        return best

    def write_rate_between(self, key: str, t0: float, t1: float) -> float | None:
        """Average write_bytes per second of `key` between two monotonic times."""
        pts = [(t, w[key]) for t, w in self.wb_timeline if key in w and t0 <= t <= t1]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def cpu_between(self, key: str, t0: float, t1: float) -> float | None:
        """Average CPU use (fraction of one core) of `key` between two monotonic times."""
        pts = [(t, c[key]) for t, c in self.timeline if key in c and t0 <= t <= t1]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


# -- the agent with the shipped defaults ------------------------------------------------------

GATEWAY_ID = "bench-gw"
CLIENT_ID = "edge-agent-bench"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_agent_config(
    path: Path,
    *,
    mqtt_port: int,
    receiver_url: str,
    buffer_path: Path,
    health_port: int,
    gateway_id: str = GATEWAY_ID,
    client_id: str = CLIENT_ID,
    **sections: dict[str, Any],
) -> Path:
    """A config with the defaults of config.example.toml, plus per-section overrides
    (e.g. aggregate={"idle_close_s": 2.0}, forward={"max_chunks_per_s": 1e6})."""
    base: dict[str, dict[str, Any]] = {
        "mqtt": {"host": HOST, "port": mqtt_port, "client_id": client_id,
                 "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
        "aggregate": {},
        "buffer": {"path": str(buffer_path)},
        "forward": {"url": receiver_url},
        "health": {"listen": f"{HOST}:{health_port}"},
        "log": {"level": "info"},
    }  # fmt: skip
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    lines = [f"gateway_id = {_toml(gateway_id)}"]
    for section, values in base.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_agent(
    work: Path, broker_port: int, receiver_url: str, *, ready_timeout_s: float = 60,
    gateway_id: str = GATEWAY_ID, client_id: str = CLIENT_ID, **sections: dict[str, Any],
) -> Agent:  # fmt: skip
    """Write a config, start `python -m agent.cli run`, wait for /readyz. `sections` are
    per-section overrides, as in write_agent_config."""
    health_port = free_port()
    config = write_agent_config(
        work / "agent.toml",
        mqtt_port=broker_port,
        receiver_url=receiver_url,
        buffer_path=work / "agent" / "buffer.sqlite3",
        health_port=health_port,
        gateway_id=gateway_id,
        client_id=client_id,
        **sections,
    )
    agent = Agent(config, work / "agent.log", health_port).start()
    try:
        agent.wait_ready(timeout_s=ready_timeout_s)
    except BaseException:
        agent.kill()
        raise
    return agent


def agent_figure(agent: Agent, *path: str) -> Any:
    """One value from /status (None if the agent does not answer)."""
    doc: Any = agent.status()
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


# -- baseline consumers -----------------------------------------------------------------------


class _Counting:
    """A child process whose stdout tells how many messages it has received."""

    popen: subprocess.Popen[bytes]
    count: int
    ready: threading.Event

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 10) -> None:
        terminate(self.popen, timeout_s)
        self._thread.join(timeout=2)

    _thread: threading.Thread


class BareSub(_Counting):
    """bench.bare_sub: a bare aiomqtt QoS 1 subscriber that only counts."""

    def __init__(self, port: int, log_path: Path, max_seconds: float = 600) -> None:
        self.count = 0
        self.ready = threading.Event()
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed by the reader thread
        self.popen = subprocess.Popen(
            bench_command("bare_sub", "--port", str(port), "--max-seconds", str(max_seconds)),
            stdout=subprocess.PIPE, stderr=self._log, start_new_session=True, cwd=ROOT,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            s = line.strip()
            if s == b"ready":
                self.ready.set()
            elif s.isdigit():
                self.count = int(s)
        self._log.close()

    def wait_ready(self, timeout_s: float = 30) -> None:
        wait_for(
            lambda: self.ready.is_set() or not self.running, timeout_s=timeout_s,
            what="bare aiomqtt subscriber",
        )  # fmt: skip
        if not self.ready.is_set():
            raise RuntimeError("bare aiomqtt subscriber exited before subscribing")


PROBE_TOPIC = "site/cam/probe/ready"


class MosqSub(_Counting):
    """The broker's own C client: `mosquitto_sub -q 1`, one output byte per message.

    Readiness: a retained probe message is published before it starts; receiving it (the one
    byte it prints) means the subscription is in place. The probe is not counted.
    """

    def __init__(self, port: int, log_path: Path) -> None:
        sub = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
        pub = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
        subprocess.run(
            [pub, "-h", HOST, "-p", str(port), "-V", "mqttv5", "-q", "1", "-r",
             "-t", PROBE_TOPIC, "-m", "x"],
            check=True, timeout=10, capture_output=True,
        )  # fmt: skip
        self.count = 0
        self._raw = 0
        self.ready = threading.Event()
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed by the reader thread
        self.popen = subprocess.Popen(
            [sub, "-h", HOST, "-p", str(port), "-V", "mqttv5", "-q", "1",
             "-i", f"bench-mosqsub-{os.getpid()}", "-t", "site/cam/+/+",
             "-D", "connect", "receive-maximum", "65535", "-F", "x", "-N"],
            stdout=subprocess.PIPE, stderr=self._log, start_new_session=True, bufsize=0,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        while True:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            self._raw += len(data)
            if self._raw >= 1:
                self.ready.set()
            self.count = max(0, self._raw - 1)
        self._log.close()

    def wait_ready(self, timeout_s: float = 30) -> None:
        wait_for(
            lambda: self.ready.is_set() or not self.running, timeout_s=timeout_s,
            what="mosquitto_sub",
        )  # fmt: skip
        if not self.ready.is_set():
            raise RuntimeError("mosquitto_sub exited before subscribing")


# -- numbers ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear-interpolated percentile (p in 0..100) of unsorted values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def weighted_percentile(pairs: Iterable[tuple[float, int]], p: float) -> float | None:
    """Percentile of values each repeated `weight` times (p in 0..100)."""
    items = sorted((v, w) for v, w in pairs if w > 0)
    total = sum(w for _, w in items)
    if not total:
        return None
    rank = total * p / 100
    acc = 0
    for v, w in items:
        acc += w
        if acc >= rank:
            return v
    return items[-1][0]


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def kill_quietly(*procs: Any) -> None:
    """Stop what a benchmark started (SIGTERM, then SIGKILL), ignoring what already exited."""
    for p in procs:
        if p is None:
            continue
        with contextlib.suppress(Exception):
            p.stop()
