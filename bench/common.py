"""The benchmarks' one harness: child processes, /proc sampling, machine noise, the same-run
baselines (bare aiomqtt, mosquitto_sub), figures and the reports written from them.

Mosquitto, the reference receiver and the agent as processes are devtools.procs; this module
adds what benchmarks need on top: the agent with the shipped defaults, /proc readings, the
baseline consumers and the figure output that bench.run_all collects.

Every script is a module run from the repository root (`python -m bench.<name>`); a script that
starts another as a child builds the command with bench_command() and starts it with cwd=ROOT
(or env=child_env() where the cwd cannot be set), so it works from anywhere. Every script writes
its working files under bench/out/<script>/ (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from devtools.procs import (
    HOST,
    Agent,
    Mosquitto,
    Proc,
    Receiver,
    agent_config,
    free_port,
    merged,
    mosquitto_binary,
    terminate,
    toml_text,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024
GATEWAY_ID = "bench-gw"


# -- child processes, arguments, output -------------------------------------------------------


def bench_command(name: str, *args: str) -> list[str]:
    """`python -m bench.<name> args...` with this interpreter (start it with cwd=ROOT)."""
    return [sys.executable, "-m", f"bench.{name}", *args]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository root first on PYTHONPATH."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def parser(
    description: str, *, quick: bool = True, json_out: bool = True
) -> argparse.ArgumentParser:
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # `python -m bench.<name>`
    p = argparse.ArgumentParser(
        prog=f"python -m {spec.name}" if spec is not None else None, description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    if quick:
        p.add_argument("--quick", action="store_true", help="short durations (smoke run)")
    if json_out:
        p.add_argument("--json-out", type=Path, help="also write the figures here")
    return p


def fresh_dir(name: str) -> Path:
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def say(msg: str) -> None:
    print(msg, flush=True)


def write_json(path: Path | None, doc: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, default=str))


class _Text(string.Formatter):
    """str.format where None (or a missing name) reads "n/a" and a few specs carry their unit."""

    SPECS: ClassVar[dict[str, Callable[[Any], str]]] = {
        "pct": lambda v: f"{v * 100:.1f} %",  # a fraction of one core
        "x": lambda v: f"{v:.2f}x",
        "n": lambda v: f"{v:,.0f}",
        "sec": lambda v: f"{v:.2f} s",
        "kibs": lambda v: f"{v / 1024:,.0f} KiB/s",
        "min": lambda v: f"{v / 60:.1f} min",
    }

    def get_value(self, key: int | str, args: Any, kwargs: Any) -> Any:
        return kwargs.get(key) if isinstance(key, str) else args[key]

    def format_field(self, value: Any, spec: str) -> str:
        if value is None:
            return "n/a"
        f = self.SPECS.get(spec)
        return f(value) if f else super().format_field(value, spec)


_TEXT = _Text()


def fill(template: str, /, **values: Any) -> str:
    """A report line from its template: `fill("{cpu:pct} of one core", cpu=None)` -> "n/a ..."."""
    return _TEXT.vformat(template, (), values)


def md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


class Report:
    """The figures of one script: printed as they come, written as JSON at the end.

    rows: what the issue asks for, (figure, target, measured, baseline, verdict), for the
    RESULTS.md table; figures: every number; notes: how it was measured, caveats.
    """

    def __init__(self, name: str, quick: bool) -> None:
        self.name, self.mode, self.started = name, "quick" if quick else "full", time.time()
        self.rows: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []
        self.load, self.machine = MachineLoad(), machine_description()
        self.calibration_start = calibrate()
        say(f"[{name}] mode {self.mode}; machine calibration {self.calibration_start:,.0f} ops/s")

    def figure(self, key: str, value: Any, text: str | None = None) -> None:
        self.figures[key] = value
        if text is not None:
            say(f"[{self.name}] {text}")

    def row(self, figure: str, target: str, measured: str, baseline: str, ok: bool | None) -> None:
        self.rows.append({"figure": figure, "target": target, "measured": measured,
                          "baseline": baseline, "ok": ok})  # fmt: skip
        verdict = {True: "MEETS", False: "MISSES", None: "n/a"}[ok]
        say(f"[{self.name}] {figure}: {measured} (target {target}; baseline {baseline}) {verdict}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"[{self.name}] note: {text}")

    def finish(self, json_out: Path | None) -> dict[str, Any]:
        calibration_end = calibrate()
        busy, steal = self.load.read()
        doc = {
            "name": self.name, "mode": self.mode,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "rows": self.rows, "figures": self.figures, "notes": self.notes,
            "machine": self.machine, "agent_commit_at_start": self.machine["agent_commit"],
            "agent_commit_at_end": machine_description()["agent_commit"],
            "noise": {
                "calibration_start_ops_s": round(self.calibration_start),
                "calibration_end_ops_s": round(calibration_end),
                "machine_busy_pct": round(busy, 1), "machine_steal_pct": round(steal, 1),
                "loadavg_end": os.getloadavg()[0],
            },
        }  # fmt: skip
        say(f"[{self.name}] done in {doc['seconds']} s; machine busy {busy:.0f}% of all cores "
            f"(steal {steal:.1f}%) during the run; calibration {self.calibration_start:,.0f} -> "
            f"{calibration_end:,.0f} ops/s")  # fmt: skip
        write_json(json_out, doc)
        return doc


# -- machine noise ----------------------------------------------------------------------------


def calibrate(seconds: float = 0.3) -> float:
    """A fixed pure-Python reference workload (dict/str/json work like the agent's): ops/s.

    Run at the start and end of every script: a drop means the shared machine got slower while
    the benchmark ran, which is the reason every figure has a same-run baseline.
    """
    doc = {"ts": 1764126000.123, "cls": "person", "conf": 0.87, "frame": 12}
    n, started = 0, time.perf_counter()
    while time.perf_counter() < started + seconds:
        for _ in range(200):
            d = json.loads(json.dumps(doc, separators=(",", ":")))
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
        d = [b - a for a, b in zip(self._t0, self._sample(), strict=False)]
        total = sum(d[:8]) or 1  # user nice system idle iowait irq softirq steal
        steal = d[7] if len(d) > 7 else 0
        return 100.0 * (total - d[3] - d[4]) / total, 100.0 * steal / total


def _first_line(path: str, prefix: str) -> str | None:
    with contextlib.suppress(OSError), open(path) as f:
        return next((line for line in f if line.startswith(prefix)), None)
    return None


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()


def machine_description() -> dict[str, Any]:
    model = _first_line("/proc/cpuinfo", "model name")
    mem = _first_line("/proc/meminfo", "MemTotal:")
    mosq = fs = commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        mosq = "not found"
        mosq = (_run(mosquitto_binary(), "-h").splitlines() or ["?"])[0].strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        df = _run("df", "--output=fstype,source", str(OUT.parent)).split()
        fs = " on ".join(df[-2:]) if len(df) >= 4 else "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        # Read-only git queries: which agent code was measured.
        dirty = _run("git", "-C", str(ROOT), "status", "--porcelain", "--", "agent")
        commit = _run("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD") + (
            " + uncommitted changes in agent/" if dirty else ""
        )
    return {
        "agent_commit": commit, "nproc": os.cpu_count(),
        "cpu_model": model.split(":", 1)[1].strip() if model else "?",
        "ram_gib": round(int(mem.split()[1]) / 1024**2, 1) if mem else 0.0,
        "kernel": platform.release(), "python": platform.python_version(), "mosquitto": mosq,
        "filesystem": fs, "loadavg": os.getloadavg(),
    }  # fmt: skip


# -- /proc readings and sampling ----------------------------------------------------------------


class ProcStat:
    """CPU seconds, /proc/PID/status fields (RSS, peak RSS...) and I/O counters of one pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads

    def status(self, *keys: str) -> dict[str, int]:
        """Fields of /proc/PID/status as numbers (KiB for the Vm/Rss ones), one read."""
        with open(f"/proc/{self.pid}/status") as f:
            pairs = (line.partition(":") for line in f)
            return {k: int(rest.split()[0]) for k, _, rest in pairs if k in keys}

    def rss_kb(self) -> int:
        return self.status("VmRSS").get("VmRSS", 0)

    def hwm_kb(self) -> int:
        return self.status("VmHWM").get("VmHWM", 0)

    def io(self) -> dict[str, int]:
        with open(f"/proc/{self.pid}/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f)}


def pid(p: Proc | None) -> int:
    """The pid of a started child process."""
    assert p is not None and p.popen is not None
    return p.popen.pid


class Sampler(threading.Thread):
    """Samples processes: at start() and then every interval_s on a fixed grid (or at each
    take()), per process its CPU seconds, RSS, peak RSS, anonymous RSS, threads (/proc/PID/status)
    and write_bytes (/proc/PID/io). `extra(sample, previous)` adds what a script reads besides
    (the agent's /status...). Sample times "t" are time.monotonic()."""

    FIELDS: ClassVar[dict[str, str]] = {
        "VmRSS": "rss_kb", "VmHWM": "hwm_kb", "RssAnon": "anon_kb", "Threads": "threads",
    }  # fmt: skip

    def __init__(
        self, pids: dict[str, int], interval_s: float = 0.25,
        extra: Callable[[dict[str, Any], dict[str, Any] | None], None] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.procs = {k: ProcStat(p) for k, p in pids.items()}
        self.interval_s, self.extra = interval_s, extra
        self.samples: list[dict[str, Any]] = []
        self._stop_ev = threading.Event()

    def take(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t": time.monotonic()}
        for k, st in self.procs.items():
            with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
                got = {self.FIELDS[f]: v for f, v in st.status(*self.FIELDS).items()}
                s[k] = {**got, "cpu_s": st.cpu_s(), "write_bytes": st.io()["write_bytes"]}
        if self.extra is not None:
            self.extra(s, self.samples[-1] if self.samples else None)
        self.samples.append(s)
        return s

    def run(self) -> None:
        t0, k = time.monotonic(), 0
        while not self._stop_ev.wait(max(0.0, t0 + k * self.interval_s - time.monotonic())):
            self.take()
            k += 1

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(timeout=30)

    def max_rss_kb(self, key: str) -> int:
        return max((s[key]["rss_kb"] for s in self.samples if key in s), default=0)

    def rss_at(self, key: str, t: float) -> int | None:
        """RSS (KiB) of `key` at the last sample taken at or before monotonic time t."""
        return next((s[key]["rss_kb"] for s in reversed(self.samples)
                     if s["t"] <= t and key in s), None)  # fmt: skip

    def rate(self, key: str, field: str, t0: float, t1: float) -> float | None:
        """Average growth per second of a counter (cpu_s: the CPU use, a fraction of one core;
        write_bytes) of `key` between two monotonic times."""
        pts: list[tuple[float, float]] = [
            (s["t"], s[key][field]) for s in self.samples if key in s and t0 <= s["t"] <= t1
        ]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def cpu_between(self, key: str, t0: float, t1: float) -> float | None:
        return self.rate(key, "cpu_s", t0, t1)


# -- the agent, and the site around it ----------------------------------------------------------


def start_agent(
    work: Path, broker_port: int, receiver_url: str, *, ready: bool = True,
    test_config: bool = False, env: dict[str, str] | None = None, gateway_id: str = GATEWAY_ID,
    client_id: str = "edge-agent-bench", **sections: Any,
) -> Agent:  # fmt: skip
    """The agent as a child process (config work/agent.toml, outbox under work/agent/): the
    defaults of config.example.toml but ports, paths, a 0.1-1 s MQTT reconnect and per-section
    overrides (e.g. aggregate={"idle_close_s": 2.0}); with test_config, devtools' test config
    instead (short lateness and linger) with the same overrides. `env` is the agent's own
    environment (LD_PRELOAD...). Waits for /readyz unless ready=False."""
    health_port, config = free_port(), work / "agent.toml"
    (work / "agent").mkdir(parents=True, exist_ok=True)
    buffer = work / "agent" / "buffer.sqlite3"
    if test_config:
        agent_config(path=config, gateway_id=gateway_id, mqtt_port=broker_port,
                     receiver_url=receiver_url, buffer_path=buffer, client_id=client_id,
                     health_port=health_port, overrides=sections)  # fmt: skip
    else:
        base = {
            "gateway_id": gateway_id,
            "mqtt": {"host": HOST, "port": broker_port, "client_id": client_id,
                     "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
            "aggregate": {}, "buffer": {"path": str(buffer)},
            "forward": {"url": receiver_url}, "health": {"listen": f"{HOST}:{health_port}"},
            "log": {"level": "info"},
        }  # fmt: skip
        config.write_text(toml_text(merged(base, sections)))
    return respawn(Agent(config, work / "agent.log", health_port), env=env, ready=ready)


def respawn(old: Agent, *, env: dict[str, str] | None = None, ready: bool = True) -> Agent:
    """Start the agent again with the same config, health port, log and environment."""
    agent = Agent(Path(old.args[-1]), old.log_path, old.health_port)
    agent._env = {**os.environ, **env} if env else old._env
    agent.start()
    try:
        if ready:
            agent.wait_ready(timeout_s=60)
    except BaseException:
        agent.kill()
        raise
    return agent


@contextlib.contextmanager
def site(work: Path, **agent: Any) -> Iterator[tuple[Mosquitto, Receiver, Agent]]:
    """A private Mosquitto, the reference receiver and the agent (start_agent's keywords) in
    `work`; all stopped at the end."""
    procs: list[Any] = []
    try:
        broker = Mosquitto(work / "mosquitto").start()
        procs.append(broker)
        receiver = Receiver(work / "cloud").start()
        procs.append(receiver)
        procs.append(start_agent(work, broker.port, receiver.url, **agent))
        yield broker, receiver, procs[-1]
    finally:
        kill_quietly(*reversed(procs))


def dig(doc: Any, *path: str) -> Any:
    """doc[path[0]][path[1]]..., None where a level is missing."""
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


class Nones(dict[str, Any]):
    """A mapping for str.format where a missing key reads None, as dig() would."""

    def __missing__(self, key: str) -> None:
        return None


def idle(status: dict[str, Any] | None) -> bool:
    """/status says nothing is on its way: no window open, nothing unacked, the outbox empty."""
    paths = (("aggregate", "windows_open"), ("ingest", "unacked"), ("outbox", "chunks"))
    return all(dig(status, *p) == 0 for p in paths)


def agent_figure(agent: Agent, *path: str) -> Any:
    """One value from /status (None if the agent does not answer)."""
    return dig(agent.status(), *path)


def kill_quietly(*procs: Any) -> None:
    """Stop what a benchmark started (SIGTERM, then SIGKILL), ignoring what already exited."""
    for p in procs:
        if p is not None:
            with contextlib.suppress(Exception):
                p.stop()


class LoadThread(threading.Thread):
    """A blocking load function (bench.loadgen.run_load, ...) in the background."""

    def __init__(self, load: Callable[[], dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.load = load
        self.result: dict[str, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.load()
        except BaseException as e:  # reported by the main thread
            self.error = e


# -- baseline consumers -----------------------------------------------------------------------


class CountingSub:
    """A baseline subscriber as a child process that tells how many messages it received:

    bare    bench.bare_sub, a bare aiomqtt QoS 1 subscriber that only counts (prints counts);
    mosq    the broker's own C client, `mosquitto_sub -q 1`, one output byte per message. A
            retained probe message is published before it starts; receiving it means the
            subscription is in place. The probe is not counted.
    """

    def __init__(self, kind: str, port: int, log_path: Path, max_seconds: float = 600) -> None:
        self.kind, self.count, self.ready = kind, 0, threading.Event()
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed by the reader thread
        mosq = [HOST, "-p", str(port), "-V", "mqttv5", "-q", "1"]
        if kind == "bare":
            cmd = bench_command("bare_sub", "--port", str(port), "--max-seconds", str(max_seconds))
        else:
            subprocess.run([shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub", "-h", *mosq,
                            "-r", "-t", "site/cam/probe/ready", "-m", "x"],
                           check=True, timeout=10, capture_output=True)  # fmt: skip
            cmd = [shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub", "-h", *mosq,
                   "-i", f"bench-mosqsub-{os.getpid()}", "-t", "site/cam/+/+",
                   "-D", "connect", "receive-maximum", "65535", "-F", "x", "-N"]  # fmt: skip
        self.popen = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True, cwd=ROOT,
            bufsize=-1 if kind == "bare" else 0,
        )  # fmt: skip
        self.pid = self.popen.pid
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        if self.kind == "bare":
            for line in self.popen.stdout:
                s = line.strip()
                if s == b"ready":
                    self.ready.set()
                elif s.isdigit():
                    self.count = int(s)
        else:
            raw, fd = 0, self.popen.stdout.fileno()
            while data := os.read(fd, 1 << 16):
                raw += len(data)
                self.ready.set()
                self.count = max(0, raw - 1)  # the probe
        self._log.close()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, timeout_s: float = 30) -> CountingSub:
        what = {"bare": "bare aiomqtt subscriber", "mosq": "mosquitto_sub"}[self.kind]
        wait_for(lambda: self.ready.is_set() or not self.running, timeout_s=timeout_s, what=what)
        if not self.ready.is_set():
            raise RuntimeError(f"{what} exited before subscribing")
        return self

    def stop(self, timeout_s: float = 10) -> None:
        terminate(self.popen, timeout_s)
        self._thread.join(timeout=2)


# -- numbers ----------------------------------------------------------------------------------


def weighted_percentile(pairs: Iterable[tuple[float, int]], p: float) -> float | None:
    """Percentile of values each repeated `weight` times (p in 0..100)."""
    items = sorted((v, w) for v, w in pairs if w > 0)
    rank, acc = sum(w for _, w in items) * p / 100, 0
    for v, w in items:
        acc += w
        if acc >= rank:
            return v
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def rnd(x: float | None, nd: int | None = 2) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class Fit:
    """Least-squares line y = a + b t: slope b (per hour when t is in hours) and its stderr."""

    n: int
    slope: float
    stderr: float
    mean: float

    @property
    def significant(self) -> bool:
        return self.n >= 3 and abs(self.slope) > 2 * self.stderr


def linfit(points: Iterable[tuple[float, float | None]]) -> Fit | None:
    pts = [(t, y) for t, y in points if y is not None and math.isfinite(y)]
    n = len(pts)
    if n < 2:
        return None
    mt, my = sum(t for t, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((t - mt) ** 2 for t, _ in pts)
    if sxx == 0:
        return None
    b = sum((t - mt) * (y - my) for t, y in pts) / sxx
    resid = sum((y - (my - b * mt + b * t)) ** 2 for t, y in pts)
    return Fit(n, b, math.sqrt(resid / (n - 2) / sxx) if n > 2 else math.inf, my)
