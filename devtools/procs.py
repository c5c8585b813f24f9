"""Real local processes for tests, the demo and benchmarks: Mosquitto, the receiver, the agent.

Everything binds to loopback on a free port. Waits poll a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

from agent.sim.cameras import SimOptions, read_record, run_simulation
from devtools.truth import Expected, expected_table

HOST = "127.0.0.1"


def _insecure() -> ssl.SSLContext:
    """For the test harness's own admin calls to a local TLS receiver (not the agent's path)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], object], *, timeout_s: float, what: str, poll_s: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy; raise TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise FileNotFoundError("mosquitto not found: apt-get install -y mosquitto")


def terminate(popen: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM, then SIGKILL if the process does not exit within timeout_s; the exit code."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    return popen.returncode


class Proc:
    """A child process with its log file; stop() terminates, kill() is SIGKILL."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.popen = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True
        )
        log.close()
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.popen is None:
            return None
        return terminate(self.popen, timeout_s)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Mosquitto(Proc):
    """A private Mosquitto on a free loopback port, with persistence and a large queue."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        tls: tuple[Path, Path, Path] | None = None,
        require_certificate: bool = True,
        anonymous: bool = True,
        conf_extra: str = "",
        persistence: bool = True,
        autosave_interval: int = 1,
        autosave_on_changes: bool = False,
    ) -> None:
        """`anonymous=False` needs a `password_file` line in `conf_extra` (per listener
        settings such as `max_qos` go there too). `persistence=False`: a restart forgets every
        session and queued message (Debian's package keeps them). With persistence, a snapshot
        every `autosave_interval` seconds, or changes with `autosave_on_changes`."""
        self.port = port or free_port()
        # With tls=(ca, cert, key): a second listener, TLS (and mTLS) only, on tls_port.
        self.tls_port = free_port() if tls else None
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {HOST}\n"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            + conf_extra
            + f"persistence {'true' if persistence else 'false'}\n"
            f"persistence_location {workdir}/\n"
            f"autosave_interval {autosave_interval}\n"
            f"autosave_on_changes {'true' if autosave_on_changes else 'false'}\n"
            "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 0\n"
            "message_size_limit 0\n"
            # As root, mosquitto would drop to user `mosquitto`, which cannot write here.
            + ("user root\n" if os.geteuid() == 0 else "")
            + (
                f"listener {self.tls_port} {HOST}\n"
                f"cafile {tls[0]}\ncertfile {tls[1]}\nkeyfile {tls[2]}\n"
                "tls_version tlsv1.2\n"
                f"require_certificate {'true' if require_certificate else 'false'}\n"
                if tls
                else ""
            )
        )
        super().__init__([mosquitto_binary(), "-c", str(conf)], workdir / "mosquitto.log")

    def start(self) -> Self:
        super().start()
        wait_for(lambda: port_open(self.port) or not self.running, timeout_s=10, what="mosquitto")
        if not self.running:
            raise RuntimeError(f"mosquitto did not start:\n{self.log_text()}")
        return self


class Receiver(Proc):
    """The reference receiver (`edge-agent simulate cloud`) as a child process."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra: list[str] | None = None,
        *,
        tls: tuple[Path, Path] | None = None,
    ):
        self.port = port or free_port()
        self.scheme = "https" if tls else "http"
        if tls:
            extra = [*(extra or []), "--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self.db = workdir / "cloud.sqlite3"
        workdir.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", "agent.cli", "simulate", "cloud",
            "--listen", f"{HOST}:{self.port}", "--db", str(self.db), *(extra or []),
        ]  # fmt: skip
        super().__init__(args, workdir / "cloud.log")

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}/ingest"

    def start(self) -> Self:
        super().start()
        wait_for(lambda: port_open(self.port) or not self.running, timeout_s=15, what="receiver")
        if not self.running:
            raise RuntimeError(f"receiver did not start:\n{self.log_text()}")
        return self

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            f"{self.scheme}://{HOST}:{self.port}/_stats", timeout=5, context=_insecure()
        ) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    def fault(self, **settings: Any) -> None:
        req = urllib.request.Request(
            f"{self.scheme}://{HOST}:{self.port}/_fault",
            data=json.dumps(settings).encode(),
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5, context=_insecure()):
            pass

    def messages(self) -> int:
        with contextlib.suppress(OSError):
            return int(self.stats()["messages"])
        return -1


def agent_config(
    *,
    path: Path,
    gateway_id: str,
    mqtt_port: int,
    receiver_url: str,
    buffer_path: Path,
    client_id: str = "edge-agent-test",
    health_port: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    extra: str = "",
) -> Path:
    """Write a config for a test/demo agent (short lateness so chunks close quickly).

    `overrides` is deep-merged over it (tables key by key; a list, `[[streams]]` too, replaces);
    `extra` is raw TOML appended at the end."""
    base: dict[str, Any] = {
        "gateway_id": gateway_id,
        "mqtt": {
            "host": HOST,
            "port": mqtt_port,
            "client_id": client_id,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
        },
        "aggregate": {"allowed_lateness_s": 1.0, "idle_close_s": 2.0},
        "buffer": {"path": str(buffer_path), "checkpoint_interval_ms": 100},
        "forward": {
            "url": receiver_url,
            "linger_ms": 50,
            "backoff_min_s": 0.1,
            "backoff_max_s": 1.0,
            "shutdown_drain_s": 5.0,
        },
        "health": {"listen": f"{HOST}:{health_port or free_port()}"},
    }
    text = toml_text(merged(base, overrides or {}))
    path.write_text(text + (f"\n{extra}\n" if extra else ""))
    return path


def merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`, tables merged key by key."""
    out = dict(base)
    for k, v in top.items():
        old = out.get(k)
        out[k] = merged(old, v) if isinstance(old, Mapping) and isinstance(v, Mapping) else v
    return out


def toml_text(data: Mapping[str, Any]) -> str:
    """The TOML for a config: plain keys first, then tables, then arrays of tables."""
    lines = _toml_keys(data)
    for name, value in data.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{_toml_key(name)}]", *_toml_keys(value)]
        elif _is_table_array(value):
            for table in value:
                lines += ["", f"[[{_toml_key(name)}]]", *_toml_keys(table)]
    return "\n".join(lines) + "\n"


def _is_table_array(value: object) -> bool:
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], Mapping)


def _toml_keys(table: Mapping[str, Any]) -> list[str]:
    return [
        f"{_toml_key(k)} = {_toml_value(v)}"
        for k, v in table.items()
        if not isinstance(v, Mapping) and not _is_table_array(v)
    ]


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r} ({type(v).__name__})")


class Agent(Proc):
    """`edge-agent run --config ...` as a child process, with its health port."""

    def __init__(self, config: Path, log_path: Path, health_port: int) -> None:
        args = [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
        super().__init__(args, log_path)
        self.health_port = health_port

    def _get(self, path: str) -> tuple[int, Any] | None:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.health_port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        except OSError:
            return None

    def status(self) -> dict[str, Any] | None:
        """/status, or None while the endpoint is not up."""
        got = self._get("/status")
        return got[1] if got else None

    def cameras(self) -> dict[str, Any] | None:
        """/status/cameras (every camera's detail), or None while the endpoint is not up."""
        got = self._get("/status/cameras")
        return got[1] if got else None

    def wait_ready(self, timeout_s: float = 20) -> None:
        def ready() -> bool:
            if not self.running:
                raise RuntimeError(f"agent exited:\n{self.log_text()[-3000:]}")
            got = self._get("/readyz")
            return got is not None and got[0] == 200

        wait_for(ready, timeout_s=timeout_s, what="agent ready (MQTT subscribed)")


class Publisher:
    """The camera simulator in a background thread; `join()` returns the ground truth."""

    def __init__(self, broker: Mosquitto, workdir: Path, **kw: Any) -> None:
        self.record = workdir / f"published-{id(self)}.jsonl"
        self.opts = SimOptions(port=broker.port, record=self.record, **kw)
        self.summary: dict[str, Any] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.summary = run_simulation(self.opts)
        except BaseException as e:  # re-raised by join()
            self.error = e

    def start(self) -> Self:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout_s: float) -> None:
        self._thread.join(timeout=timeout_s)

    def join(self) -> dict[tuple[str, str, int], Expected]:
        self._thread.join(timeout=self.opts.duration_s + 120)
        if self.error:
            raise self.error
        if self.summary.get("failed"):
            raise RuntimeError(f"the broker did not acknowledge every publish: {self.summary}")
        if self.summary.get("reconnects"):
            raise RuntimeError(
                f"a camera publisher reconnected; ground truth unsure: {self.summary}"
            )
        return expected_table(read_record(self.record))
