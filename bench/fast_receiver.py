"""The replay benchmark's receivers: a fast checking one, and with --null a null one.

The reference receiver (`edge-agent simulate cloud`, SQLite, one row per chunk plus a merged row
per (camera, stream, t)) takes ~15,500 chunks/s on this machine: behind it the replay figure is
the receiver's, not the agent's. This one stores nothing. Per batch it

- gunzips the body and decodes it with msgspec into typed structs (schema, gateway, first_seq,
  last_seq, and per chunk only seq, seq_end, camera, stream, t, rev, count: the rest of each
  chunk is skipped by the decoder, not built into Python objects); a missing or mistyped field
  is a 400, as in the reference receiver;
- checks the schema and that the chunks tile first_seq..last_seq exactly, in order (seq_end >=
  seq for a compacted chunk): otherwise 400 with the reference receiver's message;
- deduplicates by (gateway, seq) against every seq range it has accepted (a set of disjoint
  intervals per gateway: one interval while the agent sends in order), and counts new chunks,
  their messages (sum of `count`), late deltas (rev > 0), gaps, out-of-order and duplicate
  chunks as the reference receiver does (the first batch of a gateway starts its run anywhere;
  tests/forward/test_receiver.py holds both receivers to the same scenarios).

It answers 200 {"stored": new, "duplicates": dup} like the reference receiver. Nothing is kept
per chunk, so memory stays flat whatever the backlog.

With --null it checks almost nothing: it gunzips the body, checks the chunk count against
first_seq..last_seq from the batch head (no JSON parse of the chunks), counts and answers 200:
the replay figure into it is what the agent alone can push.

    python -m bench.fast_receiver --port 8099 [--null]
    GET /_stats -> {"chunks", "messages", "late_deltas", "batches", "bad", "bytes", "first_at",
                    "last_at", "gateways": {gw: {"max_seq", "gaps", "out_of_order",
                    "duplicates", "ranges"}}}
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec

SCHEMA = "edge-agent/v1"
MAX_BODY_BYTES = 64 * 1024 * 1024
HEAD = re.compile(rb'"first_seq":(\d+),"last_seq":(\d+)')


class ChunkHead(msgspec.Struct):
    """The fields of a wire chunk this receiver checks; the others are skipped unparsed."""

    seq: int
    camera: str
    stream: str
    t: int
    rev: int
    count: int
    seq_end: int | None = None


class BatchHead(msgspec.Struct):
    schema: str
    gateway: str
    first_seq: int
    last_seq: int
    chunks: list[ChunkHead]


_decode = msgspec.json.Decoder(BatchHead).decode


def decode_batch(body: bytes) -> BatchHead:
    """Decode and check a batch as the reference receiver does (agent/sim/cloud.py _validate):
    ValueError or msgspec.DecodeError when it refuses it."""
    b = _decode(body)
    if b.schema != SCHEMA:
        raise ValueError("schema must be edge-agent/v1")
    if not b.chunks:
        raise ValueError("chunks must be a non-empty list")
    expect = b.first_seq
    for c in b.chunks:
        end = c.seq if c.seq_end is None else c.seq_end
        if c.seq != expect or end < c.seq:
            raise ValueError("seqs must tile first_seq..last_seq, contiguous and in order")
        expect = end + 1
    if expect != b.last_seq + 1:
        raise ValueError("seqs must tile first_seq..last_seq, contiguous and in order")
    return b


class Seqs:
    """Accepted seq ranges of one gateway: sorted disjoint [lo, hi] intervals, merged on add."""

    def __init__(self) -> None:
        self.lo: list[int] = []
        self.hi: list[int] = []

    def covered(self, seq: int) -> bool:
        i = bisect.bisect_right(self.lo, seq) - 1
        return i >= 0 and seq <= self.hi[i]

    def add(self, lo: int, hi: int) -> None:
        """Add [lo, hi] (not overlapping what is there: callers add only uncovered ranges)."""
        i = bisect.bisect_right(self.lo, lo)
        if i > 0 and self.hi[i - 1] + 1 >= lo:  # touches the previous interval
            i -= 1
            self.hi[i] = max(self.hi[i], hi)
        else:
            self.lo.insert(i, lo)
            self.hi.insert(i, hi)
        while i + 1 < len(self.lo) and self.lo[i + 1] <= self.hi[i] + 1:  # swallow the next
            self.hi[i] = max(self.hi[i], self.hi[i + 1])
            del self.lo[i + 1], self.hi[i + 1]


class Gateway:
    def __init__(self) -> None:
        self.seqs, self.max_seq = Seqs(), 0
        self.gaps = self.out_of_order = self.duplicates = 0


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gateways: dict[str, Gateway] = {}
        self.chunks = self.messages = self.late_deltas = self.batches = self.bad = self.bytes = 0
        self.first_at: float | None = None  # wall time of the first and last accepted batch
        self.last_at: float | None = None

    def ingest(self, b: BatchHead) -> tuple[int, int]:
        """Count a checked batch; (new chunks, duplicate chunks). Called under the lock."""
        gw = self.gateways.setdefault(b.gateway, Gateway())
        seqs, max_seq = gw.seqs, gw.max_seq
        new = dup = messages = late = 0
        if not seqs.hi or b.first_seq > seqs.hi[-1]:
            # The usual case: everything is past what was accepted. Same bookkeeping as the
            # reference receiver's per-chunk loop, without the per-chunk lookups.
            if max_seq and b.first_seq > max_seq + 1:
                gw.gaps += 1
            new = len(b.chunks)
            messages, late = sum(c.count for c in b.chunks), sum(c.rev > 0 for c in b.chunks)
            seqs.add(b.first_seq, b.last_seq)
            max_seq = max(max_seq, b.last_seq)
        else:
            for c in b.chunks:
                end = c.seq if c.seq_end is None else c.seq_end
                if seqs.covered(c.seq):
                    dup += 1
                    continue
                if max_seq and c.seq > max_seq + 1:
                    gw.gaps += 1
                elif c.seq <= max_seq:
                    gw.out_of_order += 1
                max_seq = max(max_seq, end)
                seqs.add(c.seq, end)
                new += 1
                messages += c.count
                late += c.rev > 0
        gw.max_seq, gw.duplicates = max_seq, gw.duplicates + dup
        self.chunks, self.messages = self.chunks + new, self.messages + messages
        self.late_deltas, self.batches = self.late_deltas + late, self.batches + 1
        return new, dup

    def accepted(self, nbytes: int) -> None:
        self.bytes += nbytes
        self.last_at = time.time()
        if self.first_at is None:
            self.first_at = self.last_at

    def stats(self) -> dict[str, Any]:
        return {
            "chunks": self.chunks, "messages": self.messages, "late_deltas": self.late_deltas,
            "batches": self.batches, "bad": self.bad, "bytes": self.bytes,
            "first_at": self.first_at, "last_at": self.last_at,
            "gateways": {
                k: {"max_seq": g.max_seq, "gaps": g.gaps, "out_of_order": g.out_of_order,
                    "duplicates": g.duplicates, "ranges": len(g.seqs.lo)}
                for k, g in self.gateways.items()
            },
        }  # fmt: skip


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without TCP_NODELAY, the reply's two writes (headers, then body) meet the client's delayed
    # ACK: ~40 ms per request (Nagle). The reference receiver has exactly that; this one not.
    disable_nagle_algorithm = True
    state: State
    null = False

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _reply(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path != "/_stats":
            self._reply(404, {"error": "not found"})
            return
        with self.state.lock:
            doc = self.state.stats()
        self._reply(200, doc)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(413, {"error": "body too large"})
            self.close_connection = True
            return
        raw = self.rfile.read(length)
        if self.path != "/ingest":
            self._reply(404, {"error": "not found"})
            return
        st = self.state
        try:
            body = gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
            if self.null:
                m = HEAD.search(body, 0, 400)
                n = body.count(b'{"seq":')
                if m is None or int(m.group(2)) - int(m.group(1)) + 1 != n:
                    raise ValueError("the chunk count does not match first_seq..last_seq")
            else:
                batch = decode_batch(body)
        except (OSError, EOFError, zlib.error, ValueError, msgspec.DecodeError) as e:
            with st.lock:
                st.bad += 1
                st.bytes += len(raw) if self.null else 0
            self._reply(400, {"error": f"bad batch: {e}"})
            return
        with st.lock:
            if self.null:
                st.batches += 1
                st.chunks += n
                new, dup = n, 0
            else:
                new, dup = st.ingest(batch)
            st.accepted(len(raw))
        self._reply(200, {"stored": new, "duplicates": dup})


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fast_receiver",
                                description=(__doc__ or "").splitlines()[0])  # fmt: skip
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--null", action="store_true", help="check only the chunk count")
    args = p.parse_args()
    Handler.state = State()
    Handler.null = args.null
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
