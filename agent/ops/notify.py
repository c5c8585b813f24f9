"""systemd notify protocol (sd_notify): READY, WATCHDOG, STATUS, STOPPING over a unix datagram.

A few lines over NOTIFY_SOCKET, so no extra dependency. Without NOTIFY_SOCKET every call is a
no-op. WATCHDOG=1 is sent from the pipeline's own progress (each checkpoint), at most twice per
WatchdogSec, so a stalled pipeline stops the pings and systemd restarts the agent.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        self.watchdog_interval_s = watchdog_usec / 1e6 / 2 if watchdog_usec else None
        self._last_ping = -1e18
        self._failed = False

    @classmethod
    def from_env(cls) -> Notifier:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid.isdigit() and int(pid) != os.getpid():
            usec = None
        return cls(os.environ.get("NOTIFY_SOCKET"), int(usec) if usec and usec.isdigit() else None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, message: str) -> None:
        if self._sock is None or self._address is None:
            return
        addr = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            self._sock.sendto(message.encode(), addr)
        except OSError as e:
            if not self._failed:
                log.warning("sd_notify to %s failed: %s", self._address, e)
                self._failed = True

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=shutting down")

    def progress(self, now_mono: float | None = None) -> None:
        """The pipeline made progress: ping the watchdog if it is due."""
        if self.watchdog_interval_s is None:
            return
        now_mono = time.monotonic() if now_mono is None else now_mono
        if now_mono - self._last_ping >= self.watchdog_interval_s:
            self._last_ping = now_mono
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
