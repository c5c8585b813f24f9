"""One agent per outbox (G11): an exclusive flock on `<outbox>.lock`, taken before anything else.

The lock file holds the owner's pid, for the message a second instance prints. The kernel drops
the lock when the process dies (also by SIGKILL), so a stale file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from agent.core.errors import AlreadyRunning


class OutboxLock:
    def __init__(self, outbox_path: Path) -> None:
        self.path = outbox_path.with_name(outbox_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning at once (never waits)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.path, pid) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutboxLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        data = os.pread(fd, 32, 0)
        return int(data.decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def holder(outbox_path: Path) -> int | None:
    """The pid of the process holding this outbox's lock, or None, read from /proc/locks: no
    lock is taken, so an agent starting at that moment is never refused (a trial lock here
    made starting agents fail with "another edge-agent holds it", found by the adversary),
    and a stale pid in the file is never taken for an agent."""
    path = outbox_path.with_name(outbox_path.name + ".lock")
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE" and parts[5] == ident:
            return int(parts[4])
    return None
