"""One agent per outbox (G11): the flock on `<outbox>.lock`, in-process and between processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core.errors import AlreadyRunning
from agent.durable.lock import OutboxLock
from devtools.procs import Agent, free_port, port_open, wait_for
from tests.helpers import AgentFactory

HOLD = """
import sys, time
from pathlib import Path
from agent.durable.lock import OutboxLock
OutboxLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""


def files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if not p.name.endswith(".tmp")}


def test_second_lock_on_the_same_outbox_is_refused_naming_the_pid(tmp_path: Path) -> None:
    outbox = tmp_path / "state" / "buffer.sqlite3"
    first = OutboxLock(outbox)
    first.acquire()
    try:
        assert first.path == tmp_path / "state" / "buffer.sqlite3.lock"
        assert first.path.read_text().strip() == str(os.getpid())
        with pytest.raises(AlreadyRunning) as e:
            OutboxLock(outbox).acquire()
        assert e.value.pid == os.getpid()
        assert e.value.path == first.path
        assert f"another edge-agent holds {first.path} (pid {os.getpid()})" in str(e.value)
        with pytest.raises(AlreadyRunning), OutboxLock(outbox):
            pass
    finally:
        first.release()
    # Released: it can be taken again (the file left behind does not block).
    assert first.path.exists()
    with OutboxLock(outbox) as again:
        assert again.path.read_text().strip() == str(os.getpid())
    first.acquire()  # and by the first holder, too
    first.release()
    first.release()  # idempotent


@pytest.mark.e2e
def test_lock_held_by_another_process_and_dropped_when_it_dies(tmp_path: Path) -> None:
    outbox = tmp_path / "buffer.sqlite3"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(outbox)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"held"
        with pytest.raises(AlreadyRunning) as e:
            OutboxLock(outbox).acquire()
        assert e.value.pid == child.pid
        assert f"pid {child.pid}" in str(e.value)
        # SIGKILL: no cleanup runs, the stale file stays, yet the kernel dropped the lock.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert (tmp_path / "buffer.sqlite3.lock").read_text().strip() == str(child.pid)
        with OutboxLock(outbox) as lock:
            assert lock.path.read_text().strip() == str(os.getpid())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_second_agent_on_the_same_outbox_exits_3(agents: AgentFactory, tmp_path: Path) -> None:
    """A second `edge-agent run` with the same config (its own health port, so only the lock
    can stop it) exits 3 at once with one line naming the running agent, and touches nothing."""
    first = agents.start()
    assert first.popen is not None
    before = files(agents.buffer.parent)
    port = free_port()
    second = Agent(agents.config(), tmp_path / "second.log", port)
    second._env = {**os.environ, "EDGE_AGENT__HEALTH__LISTEN": f"127.0.0.1:{port}"}
    second.start()
    try:
        assert second.wait(timeout_s=15) == 3
    finally:
        second.kill()
    text = second.log_text()
    assert "another edge-agent holds" in text, text[-2000:]
    assert f"pid {first.popen.pid}" in text
    assert "Traceback" not in text
    assert not port_open(port)
    # The first agent runs on, alone with its outbox; nothing was moved aside or created.
    assert first.running
    wait_for(lambda: (first.status() or {}).get("outbox") is not None, timeout_s=10, what="status")
    assert files(agents.buffer.parent) == before
    assert not list(agents.buffer.parent.glob("*.corrupt-*"))
    assert first.stop() == 0
