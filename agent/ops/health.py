"""Local health endpoint on the agent's own event loop: h11 over asyncio streams.

One request per connection, a bounded request size and a read timeout; unknown paths 404,
other methods 405, malformed or oversized requests get a 400 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import h11

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_S = 5.0

Response = tuple[int, str, bytes]


def json_response(status: int, doc: Any, *, compact: bool = False) -> Response:
    body = json.dumps(doc, separators=(",", ":")) if compact else json.dumps(doc, indent=1)
    return status, "application/json", body.encode()


class Cached:
    """A route's answer, computed at most once per `ttl_s`: however many clients poll a large
    document, building it costs the event loop (and so ingest) once a second at most."""

    def __init__(
        self,
        build: Callable[[], Response],
        *,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self._ttl_s = ttl_s
        self._clock = clock
        self._at: float | None = None
        self._answer: Response | None = None

    def __call__(self) -> Response:
        now = self._clock()
        if self._answer is None or self._at is None or now - self._at >= self._ttl_s:
            self._answer, self._at = self._build(), now
        return self._answer


class HealthServer:
    """Serves GET routes: path -> callable returning (status, content type, body)."""

    def __init__(self, *, listen: str, routes: dict[str, Callable[[], Response]]) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._routes = routes
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        if self._host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("health endpoint listens on %s, not loopback", self._host)
        log.info("health endpoint on http://%s:%d/status", self._host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        head = False
        try:
            try:
                request = await self._read_request(conn, reader)
                head = request.method == b"HEAD"
                status, ctype, body = self._route(request)
            except (h11.RemoteProtocolError, ValueError, TimeoutError):
                status, ctype, body = json_response(400, {"error": "bad request"})
            except asyncio.IncompleteReadError:
                return
            headers = [
                ("Content-Type", ctype),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
            if status == 405:
                headers.append(("Allow", "GET"))
            if conn.our_state is h11.SEND_RESPONSE:
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                if not head:  # HEAD: the headers of the GET answer, no body (h11 insists)
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
            else:  # the request could not even be parsed: answer without h11's state machine
                writer.write(
                    f"HTTP/1.1 {status} Bad Request\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except Exception:
            log.exception("health endpoint: request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> h11.Request:
        async with asyncio.timeout(READ_TIMEOUT_S):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(4096)
                    if not data:
                        raise asyncio.IncompleteReadError(b"", None)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    return event
                raise ValueError(f"unexpected {type(event).__name__}")

    def _route(self, request: h11.Request) -> Response:
        path = request.target.decode("latin-1").split("?", 1)[0]
        handler = self._routes.get(path)
        if handler is None:
            return json_response(404, {"error": "not found", "paths": sorted(self._routes)})
        if request.method not in (b"GET", b"HEAD"):
            return json_response(405, {"error": "method not allowed"})
        return handler()
