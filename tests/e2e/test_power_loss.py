"""G4 at the filesystem: the outbox survives a power cut with `buffer.synchronous = "full"`.

A power cut is a SIGKILL of a process that ran on a disk that keeps only what was fsynced
(tests/faultfs.py, tests/tools/lazyfs.c): its unsynced writes die with it, and directory entries
no directory fsync made durable are undone. First the disk itself is shown to drop unsynced data
and keep synced data; then SQLite through the outbox, and then the real agent under load, where
"normal" (no fsync per commit in WAL mode) is the control that must lose data.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devtools.procs import Agent, Mosquitto, Publisher, Receiver, wait_for
from tests.faultfs import PowerCutDisk
from tests.helpers import AgentFactory, assert_exact, assert_seqs_clean, wait_delivered


def _start(disk: PowerCutDisk, code: str, *args: str) -> subprocess.Popen[str]:
    """A Python child under the shim; it prints one JSON line, then waits to be killed."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **disk.env()},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _report(child: subprocess.Popen[str], timeout_s: float = 30) -> Any:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout_s)
    line = child.stdout.readline() if ready else ""
    assert line, f"the child reported nothing (exit code {child.poll()})"
    return json.loads(line)


def _power_cut(child: subprocess.Popen[str], disk: PowerCutDisk) -> list[str]:
    child.kill()
    child.wait(timeout=10)
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()
    return disk.cut()


_DATA = r"""
import json, os, sys
d = sys.argv[1]
def path(name): return os.path.join(d, name)
a = os.open(path("a"), os.O_RDWR | os.O_CREAT, 0o644)
c = os.open(path("c"), os.O_RDWR | os.O_CREAT, 0o644)
fd = os.open(d, os.O_RDONLY); os.fsync(fd); os.close(fd)  # the names are durable: data only
os.write(a, b"synced\n"); os.fsync(a)
os.write(a, b"unsynced\n")
os.pwrite(c, b"XY", 0); os.fdatasync(c)
os.pwrite(c, b"ZZ", 2); os.pwrite(c, b"W", 0)
b = os.open(path("b"), os.O_RDWR)
os.ftruncate(b, 4)
with open(path("a"), "rb") as f: a_seen = f.read().decode()
print(json.dumps({
    "a": a_seen, "a_size": os.stat(path("a")).st_size, "a_end": os.lseek(a, 0, os.SEEK_END),
    "b": open(path("b")).read(), "b_size": os.fstat(b).st_size, "c": open(path("c")).read(),
}), flush=True)
sys.stdin.read()
"""


@pytest.mark.e2e
def test_the_disk_keeps_what_was_synced_and_drops_the_rest(tmp_path: Path) -> None:
    """The shim's sanity: the process sees its own writes, the disk holds only the synced
    ones while it runs, and that is what is left after the cut."""
    d = tmp_path / "disk"
    d.mkdir()
    (d / "b").write_text("0123456789")
    disk = PowerCutDisk(d, tmp_path)
    child = _start(disk, _DATA, str(d))
    seen = _report(child)
    assert seen == {
        "a": "synced\nunsynced\n", "a_size": 16, "a_end": 16,
        "b": "0123", "b_size": 4, "c": "WYZZ",
    }  # fmt: skip
    on_disk = {name: (d / name).read_text() for name in ("a", "b", "c")}
    assert on_disk == {"a": "synced\n", "b": "0123456789", "c": "XY"}
    assert _power_cut(child, disk) == []
    assert {name: (d / name).read_text() for name in ("a", "b", "c")} == on_disk


_ENTRIES = r"""
import json, os, sys
d = sys.argv[1]
def path(name): return os.path.join(d, name)
def write(name, data):  # the data durable, the name not yet
    with open(path(name), "w") as f:
        f.write(data); f.flush(); os.fsync(f.fileno())
def sync_dir():
    fd = os.open(d, os.O_RDONLY); os.fsync(fd); os.close(fd)
write("kept.tmp", "new"); os.replace(path("kept.tmp"), path("kept")); sync_dir()
write("fresh", "data")
write("swapped.tmp", "new"); os.replace(path("swapped.tmp"), path("swapped"))
os.unlink(path("removed"))
print(json.dumps(sorted(os.listdir(d))), flush=True)
sys.stdin.read()
"""


@pytest.mark.e2e
def test_entries_are_durable_only_after_a_directory_fsync(tmp_path: Path) -> None:
    d = tmp_path / "disk"
    d.mkdir()
    for name, text in (("kept", "old"), ("swapped", "old"), ("removed", "here")):
        (d / name).write_text(text)
    disk = PowerCutDisk(d, tmp_path)
    child = _start(disk, _ENTRIES, str(d))
    assert _report(child) == ["fresh", "kept", "swapped"]
    undone = _power_cut(child, disk)
    assert [u.split()[0] for u in undone] == ["unlink", "rename", "create", "create"], undone
    assert sorted(p.name for p in d.iterdir()) == ["kept", "removed", "swapped"]
    assert (d / "kept").read_text() == "new"
    assert (d / "swapped").read_text() == "old"
    assert (d / "removed").read_text() == "here"
    assert not list(tmp_path.glob("lazyfs.log*"))


_STORE = r"""
import json, sys, time
from pathlib import Path
from agent.durable.store import CheckpointWrite, Store
store, _ = Store.open(Path(sys.argv[1]), synchronous=sys.argv[2])
for i in range(50):
    store.checkpoint(CheckpointWrite(chunks=[b'{"i": %d}' % i], journal_upserts=[(i, i)]),
                     now=time.time())
print(json.dumps({"last_seq": store.last_seq}), flush=True)
sys.stdin.read()
"""


def _committed(path: Path) -> tuple[int, int | None]:
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA quick_check").fetchone() == ("ok",)
        try:
            n, last = con.execute("SELECT count(*), max(seq) FROM chunks").fetchone()
        except sqlite3.OperationalError:  # not even the schema reached the disk
            return 0, None
        return int(n), last
    finally:
        con.close()


@pytest.mark.e2e
@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_committed_chunks_and_reserved_seqs_survive_a_power_cut(
    tmp_path: Path, synchronous: str
) -> None:
    """50 checkpoint transactions, then the cut: with "full" every committed chunk is there
    after it; with "normal" (WAL: no fsync per commit) they are not, which shows the disk
    would catch a commit that is not durable. Either way the seq high-water mark in the side
    file covers every seq used, so a new outbox file never reuses one."""
    outbox = tmp_path / "agent" / "buffer.sqlite3"
    outbox.parent.mkdir()
    disk = PowerCutDisk(outbox.parent, tmp_path)
    child = _start(disk, _STORE, str(outbox), synchronous)
    last_seq = int(_report(child)["last_seq"])
    _power_cut(child, disk)
    chunks, last = _committed(outbox)
    if synchronous == "full":
        assert (chunks, last) == (50, last_seq)
    else:
        assert chunks < 50, chunks
    reserved = outbox.with_name(outbox.name + ".seq")
    text = reserved.read_text().strip() if reserved.exists() else "(no file)"
    assert text.isdigit() and int(text) >= last_seq, (text, last_seq)


def _ingest(agent: Agent) -> dict[str, Any]:
    return dict((agent.status() or {}).get("ingest", {}))


def _acked_all(agent: Agent, published: int) -> bool:
    ingest = _ingest(agent)
    return bool(ingest.get("received") == ingest.get("acked") == published)


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_a_power_cut_of_broker_and_agent_on_a_real_disk_model_loses_nothing_acked(
    tmp_path: Path, receiver: Receiver, synchronous: str
) -> None:
    """G4 with G12's power cut: broker (no persistence) and agent die together the moment the
    agent has acked every message it received, while it is still closing windows, committing
    and forwarding; its outbox directory was on the disk that keeps only what was fsynced. With
    "full" every message is delivered exactly once by the agent restarted on what the disk
    kept; with "normal" acked messages are gone (the control: the disk has teeth)."""
    broker = Mosquitto(tmp_path / "mosquitto", persistence=False).start()
    agents = AgentFactory(tmp_path, broker, receiver)
    disk = PowerCutDisk(agents.buffer.parent, tmp_path)
    try:
        cfg = agents.config({"buffer": {"durability": "message", "synchronous": synchronous}})
        agent = agents.start(cfg, env=disk.env())
        pub = Publisher(broker, tmp_path, cameras=20, rate=20, duration_s=3, seed=31)
        expected = pub.start().join()
        published = sum(e.count for e in expected.values())
        wait_for(lambda: _acked_all(agent, published),
                 timeout_s=30, what="the agent to ack every message it received")  # fmt: skip
        agent.signal(signal.SIGKILL)
        broker.signal(signal.SIGKILL)
        agent.wait(timeout_s=10)
        broker.wait(timeout_s=10)
        assert disk.log.exists(), "the agent did not run on the shim"
        disk.cut()
        broker.start()
        agents.start(cfg, ready=False)  # on what the disk kept, without the shim
        comparison = wait_delivered(
            receiver, expected, timeout_s=30 if synchronous == "full" else 12
        )
        if synchronous == "full":
            assert_exact(comparison)
            assert_seqs_clean(receiver)
        else:
            assert comparison.missing > 0, comparison
    finally:
        agents.stop_all()
        broker.stop()


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_the_agents_disk_loses_power_mid_load_and_the_broker_redelivers_the_rest(
    agents: AgentFactory, tmp_path: Path, synchronous: str
) -> None:
    """The agent's machine loses power at 400 msgs/s while the broker (elsewhere) keeps its
    session: with "full" what the agent acked is on its disk and the broker redelivers the
    rest, every message counted once; with "normal" commits it acked are lost."""
    disk = PowerCutDisk(agents.buffer.parent, tmp_path)
    cfg = agents.config({"buffer": {"synchronous": synchronous}})
    agent = agents.start(cfg, env=disk.env())
    pub = Publisher(agents.broker, tmp_path, cameras=20, rate=20, duration_s=6, seed=32).start()
    wait_for(lambda: _ingest(agent).get("acked", 0) >= 1000,
             timeout_s=30, what="1,000 messages acked")  # fmt: skip
    agent.signal(signal.SIGKILL)
    agent.wait(timeout_s=10)
    assert pub.running, "the cut must land under load"
    assert disk.log.exists(), "the agent did not run on the shim"
    disk.cut()
    agents.start(cfg)  # on what the disk kept, without the shim
    comparison = wait_delivered(
        agents.receiver, pub.join(), timeout_s=60 if synchronous == "full" else 20
    )
    if synchronous == "full":
        assert_exact(comparison)
        assert_seqs_clean(agents.receiver)
    else:
        assert comparison.missing > 0, comparison
