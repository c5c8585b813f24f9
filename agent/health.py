"""Local health endpoint: GET /healthz, /readyz, /status on the agent's own event loop.

A deliberately small HTTP/1.1 server (one request per connection, bounded request size).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192


class HealthServer:
    """Serves JSON documents produced by callables; each returns (healthy, document)."""

    def __init__(
        self,
        *,
        listen: str,
        status: Callable[[], dict[str, Any]],
        ready: Callable[[], list[str]],
        alive: Callable[[], list[str]],
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._status = status
        self._ready = ready
        self._alive = alive
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("health endpoint on http://%s:%d/status", self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, doc = self._route(method, path.split("?", 1)[0])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError):
            status, doc = 400, {"error": "bad request"}
        body = json.dumps(doc, indent=1).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[status]  # fmt: skip
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[int, Any]:
        if path not in ("/healthz", "/readyz", "/status"):
            return 404, {"error": "not found"}
        if method != "GET":
            return 405, {"error": "method not allowed"}
        if path == "/status":
            return 200, self._status()
        problems = self._alive() if path == "/healthz" else self._ready()
        return (503 if problems else 200), {"ok": not problems, "problems": problems}


def uptime_s(started_at: float) -> float:
    return round(time.time() - started_at, 1)
