"""Baseline receiver for the replay benchmark: accepts every batch and stores nothing.

It reads the body, gunzips it, checks the chunk count against first_seq..last_seq from the
batch head (a cheap sanity check, no JSON parse of the chunks), counts, and answers 200. With it
the replay figure is what the agent alone can push; the reference receiver (SQLite, one row per
chunk plus a merge) is measured separately.

    python -m bench.null_receiver --port 8099
    GET /_stats -> {"chunks", "batches", "bytes", "bad", "max_seq", "first_at", "last_at"}
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HEAD = re.compile(rb'"first_seq":(\d+),"last_seq":(\d+)')


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunks = 0
        self.batches = 0
        self.bytes = 0
        self.bad = 0
        self.max_seq = 0
        self.first_at: float | None = None  # wall time of the first and last accepted batch
        self.last_at: float | None = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without TCP_NODELAY, the reply's two writes (headers, then body) meet the client's delayed
    # ACK: ~40 ms per request (Nagle). The reference receiver has exactly that; this one not.
    disable_nagle_algorithm = True
    counts: Counts

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        c = self.counts
        with c.lock:
            doc = {"chunks": c.chunks, "batches": c.batches, "bytes": c.bytes, "bad": c.bad,
                   "max_seq": c.max_seq, "first_at": c.first_at, "last_at": c.last_at}  # fmt: skip
        self._reply(200, doc)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
        m = HEAD.search(body, 0, 400)
        n = body.count(b'{"seq":')
        c = self.counts
        ok = m is not None and int(m.group(2)) - int(m.group(1)) + 1 == n
        with c.lock:
            c.batches += 1
            c.bytes += len(raw)
            if ok and m is not None:
                c.last_at = time.time()
                if c.first_at is None:
                    c.first_at = c.last_at
                c.chunks += n
                c.max_seq = max(c.max_seq, int(m.group(2)))
            else:
                c.bad += 1
        if ok:
            self._reply(200, {"stored": n, "duplicates": 0})
        else:
            self._reply(400, {"error": "bad batch"})


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.null_receiver")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    Handler.counts = Counts()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
