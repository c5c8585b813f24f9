"""Reference receiver: the cloud side of the wire format, on loopback, backed by SQLite.

It stores chunks deduplicated by (gateway, seq), counts gaps, out-of-order and duplicate seqs,
and merges rev deltas into one row per (gateway, camera, stream, t). It can be told to fail:
a fraction of 500s, a 429 with Retry-After every Nth batch, slow answers, or stop listening for
a while. Tests, the demo and the benchmarks use it; it is not a production server.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import random
import socket
import sqlite3
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from agent.core.model import Chunk

log = logging.getLogger("agent.sim.cloud")

MAX_BODY_BYTES = 64 * 1024 * 1024

_SCHEMA = """
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS chunks (
    gateway TEXT NOT NULL, seq INTEGER NOT NULL, camera TEXT NOT NULL, stream TEXT NOT NULL,
    t INTEGER NOT NULL, rev INTEGER NOT NULL, body TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (gateway, seq)
);
CREATE TABLE IF NOT EXISTS merged (
    gateway TEXT NOT NULL, camera TEXT NOT NULL, stream TEXT NOT NULL, t INTEGER NOT NULL,
    revs INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (gateway, camera, stream, t)
);
CREATE TABLE IF NOT EXISTS gateways (
    gateway TEXT PRIMARY KEY, max_seq INTEGER NOT NULL DEFAULT 0,
    batches INTEGER NOT NULL DEFAULT 0,
    gaps INTEGER NOT NULL DEFAULT 0, out_of_order INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0, rev0_repeats INTEGER NOT NULL DEFAULT 0
);
"""


class Store:
    """The receiver's database; every method is called under one lock."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.executescript(_SCHEMA)

    def ingest(self, batch: dict[str, Any]) -> tuple[int, int]:
        """Store a batch; returns (new chunks, duplicate chunks)."""
        gw = str(batch["gateway"])
        chunks = batch["chunks"]
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR IGNORE INTO gateways (gateway) VALUES (?)", (gw,))
            (max_seq,) = db.execute(
                "SELECT max_seq FROM gateways WHERE gateway = ?", (gw,)
            ).fetchone()
            new = dup = gaps = ooo = rev0 = 0
            now = time.time()
            for c in chunks:
                seq = int(c["seq"])
                seq_end = int(c.get("seq_end", seq))
                if db.execute(
                    "SELECT 1 FROM chunks WHERE gateway = ? AND seq = ?", (gw, seq)
                ).fetchone():
                    dup += 1
                    continue
                # The first batch of a gateway starts its seq run wherever it starts.
                if max_seq and seq > max_seq + 1:
                    gaps += 1
                elif seq <= max_seq:
                    ooo += 1
                max_seq = max(max_seq, seq_end)
                db.execute(
                    "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        gw,
                        seq,
                        c["camera"],
                        c["stream"],
                        int(c["t"]),
                        int(c["rev"]),
                        json.dumps(c),
                        now,
                    ),
                )
                key = (gw, c["camera"], c["stream"], int(c["t"]))
                row = db.execute(
                    "SELECT body FROM merged WHERE gateway=? AND camera=? AND stream=? AND t=?",
                    key,
                ).fetchone()
                incoming = Chunk.from_wire(c)
                if row is None:
                    wire = _merged_wire(incoming, has_rev0=incoming.rev == 0)
                    db.execute("INSERT INTO merged VALUES (?, ?, ?, ?, 1, ?)", (*key, wire))
                else:
                    doc = json.loads(row[0])
                    if incoming.rev == 0 and doc["has_rev0"]:
                        rev0 += 1
                    base = Chunk.from_wire(doc)
                    base.merge(incoming)
                    wire = _merged_wire(base, has_rev0=doc["has_rev0"] or incoming.rev == 0)
                    db.execute(
                        "UPDATE merged SET revs = revs + 1, body = ?"
                        " WHERE gateway=? AND camera=? AND stream=? AND t=?",
                        (wire, *key),
                    )
                new += 1
            db.execute(
                "UPDATE gateways SET max_seq = ?, batches = batches + 1, gaps = gaps + ?,"
                " out_of_order = out_of_order + ?, duplicates = duplicates + ?,"
                " rev0_repeats = rev0_repeats + ? WHERE gateway = ?",
                (max_seq, gaps, ooo, dup, rev0, gw),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return new, dup

    def stats(self) -> dict[str, Any]:
        gws = {
            r[0]: {
                "max_seq": r[1],
                "batches": r[2],
                "gaps": r[3],
                "out_of_order": r[4],
                "duplicates": r[5],
                "rev0_repeats": r[6],
            }
            for r in self.db.execute("SELECT * FROM gateways")
        }
        (chunks,) = self.db.execute("SELECT count(*) FROM chunks").fetchone()
        (merged,) = self.db.execute("SELECT count(*) FROM merged").fetchone()
        (messages,) = self.db.execute(
            "SELECT coalesce(sum(json_extract(body, '$.count')), 0) FROM chunks"
        ).fetchone()
        return {"gateways": gws, "chunks": chunks, "merged_rows": merged, "messages": messages}


def _merged_wire(c: Chunk, *, has_rev0: bool) -> str:
    w = c.to_wire()
    w["has_rev0"] = has_rev0
    return json.dumps(w)


def load_merged(db: Path, gateway: str | None = None) -> dict[tuple[str, str, int], Chunk]:
    """The merged table: (camera, stream, t) -> the sum of every rev received."""
    con = sqlite3.connect(db)
    try:
        q = "SELECT camera, stream, t, body FROM merged"
        rows = con.execute(q + " WHERE gateway = ?", (gateway,)) if gateway else con.execute(q)
        return {(c, s, int(t)): Chunk.from_wire(json.loads(b)) for c, s, t, b in rows}
    finally:
        con.close()


class CloudFaults:
    """What the receiver is told to do wrong (changeable at runtime through POST /_fault)."""

    def __init__(
        self,
        *,
        fail_rate: float,
        throttle_every: int,
        retry_after_s: float,
        delay_ms: float,
        seed: int,
    ) -> None:
        self.fail_rate = fail_rate
        self.throttle_every = throttle_every
        self.retry_after_s = retry_after_s
        self.delay_ms = delay_ms
        self.status: int | None = None
        # A chunk of this camera makes its whole batch a 422 (a poison chunk).
        self.poison_camera: str | None = None
        # Bodies larger than this (compressed) get a 413.
        self.max_body_bytes: int | None = None
        # When set, requests without "Authorization: Bearer <token>" get a 401.
        self.required_token: str | None = None
        self.rng = random.Random(seed)
        self.requests = 0
        self.injected = 0


class CloudServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], store: Store, faults: CloudFaults) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        super().__init__(addr, Handler)
        self.store = store
        self.faults = faults
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()

    def drop_connections(self) -> None:
        with self.lock:
            for s in list(self.connections):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Answers go out in two writes; without this each batch would wait for a delayed ACK.
    disable_nagle_algorithm = True
    server: CloudServer

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def _reply(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/_stats":
            with self.server.lock:
                doc = self.server.store.stats()
                doc["requests"] = self.server.faults.requests
                doc["injected_failures"] = self.server.faults.injected
            self._reply(200, doc)
        else:
            self._reply(404, {"error": "not found"})

    def _body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(413, {"error": "body too large"})
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def do_POST(self) -> None:
        raw = self._body()
        if raw is None:
            return
        if self.path == "/_fault":
            doc = json.loads(raw or b"{}")
            f = self.server.faults
            with self.server.lock:
                for k in (
                    "fail_rate", "throttle_every", "retry_after_s", "delay_ms", "status",
                    "poison_camera", "max_body_bytes", "required_token",
                ):  # fmt: skip
                    if k in doc:
                        setattr(f, k, doc[k])
            self._reply(200, {"ok": True})
            return
        if self.path != "/ingest":
            self._reply(404, {"error": "not found"})
            return
        f = self.server.faults
        with self.server.lock:
            f.requests += 1
            n = f.requests
            fail = f.rng.random() < f.fail_rate
            throttle = bool(f.throttle_every) and n % f.throttle_every == 0
            delay_s = f.delay_ms / 1000
            forced = f.status
            poison = f.poison_camera
            max_body = f.max_body_bytes
            token = f.required_token
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            f.injected += 1
            self._reply(401, {"error": "bad or missing token"})
            return
        if delay_s:
            time.sleep(delay_s)
        if forced is not None:
            f.injected += 1
            extra = {"Retry-After": f"{f.retry_after_s:g}"} if forced in (429, 503) else {}
            if 300 <= forced < 400:
                extra = {"Location": "http://127.0.0.2:1/elsewhere"}
            self._reply(forced, {"error": "forced by /_fault"}, extra)
            return
        if max_body is not None and len(raw) > max_body:
            f.injected += 1
            self._reply(413, {"error": f"body over {max_body} bytes"})
            return
        if throttle:
            f.injected += 1
            self._reply(429, {"error": "slow down"}, {"Retry-After": f"{f.retry_after_s:g}"})
            return
        if fail:
            f.injected += 1
            self._reply(500, {"error": "injected failure"})
            return
        try:
            if self.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
            batch = json.loads(raw)
            _validate(batch)
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._reply(400, {"error": f"bad batch: {e}"})
            return
        if poison is not None and any(c.get("camera") == poison for c in batch["chunks"]):
            f.injected += 1
            self._reply(422, {"error": f"chunk of camera {poison} refused"})
            return
        with self.server.lock:
            new, dup = self.server.store.ingest(batch)
        self._reply(200, {"stored": new, "duplicates": dup})


def _validate(batch: Any) -> None:
    if not isinstance(batch, dict) or batch.get("schema") != "edge-agent/v1":
        raise ValueError("schema must be edge-agent/v1")
    chunks = batch["chunks"]
    if not isinstance(chunks, list) or not chunks:
        raise ValueError("chunks must be a non-empty list")
    # Each chunk stands for seq..seq_end (seq_end > seq: a compacted chunk); together they
    # must tile first_seq..last_seq exactly, in order (G8).
    expect = int(batch["first_seq"])
    for c in chunks:
        seq = int(c["seq"])
        seq_end = int(c.get("seq_end", seq))
        if seq != expect or seq_end < seq:
            raise ValueError("seqs must tile first_seq..last_seq, contiguous and in order")
        expect = seq_end + 1
    if expect != int(batch["last_seq"]) + 1:
        raise ValueError("seqs must tile first_seq..last_seq, contiguous and in order")
    for c in chunks:
        for k in ("camera", "stream", "t", "rev", "count"):
            if k not in c:
                raise KeyError(k)


def serve(
    *,
    host: str,
    port: int,
    db: Path,
    fail_rate: float = 0.0,
    throttle_every: int = 0,
    retry_after_s: float = 1.0,
    down_after_s: float | None = None,
    down_for_s: float = 0.0,
    delay_ms: float = 0.0,
    seed: int = 1,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    token: str | None = None,
) -> None:
    """Serve until killed; with down_after_s, stop listening (and drop connections) for a while.
    With `token`, a batch without "Authorization: Bearer <token>" gets a 401."""
    store = Store(db)
    faults = CloudFaults(
        fail_rate=fail_rate,
        throttle_every=throttle_every,
        retry_after_s=retry_after_s,
        delay_ms=delay_ms,
        seed=seed,
    )
    faults.required_token = token
    while True:
        server = CloudServer((host, port), store, faults)
        if tls_cert is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(tls_cert), str(tls_key) if tls_key else None)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        log.info(
            "listening on %s:%d, db %s%s",
            host,
            port,
            db,
            ", bearer token required" if faults.required_token is not None else "",
        )
        if down_after_s is None:
            server.serve_forever()
            return
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        time.sleep(down_after_s)  # a scripted outage, not a wait for a condition
        server.shutdown()
        server.server_close()
        server.drop_connections()
        log.info("down for %.1f s", down_for_s)
        time.sleep(down_for_s)
        down_after_s = None
