"""A fast checking receiver for the replay benchmark: validates and deduplicates, stores nothing.

The reference receiver (`edge-agent simulate cloud`, SQLite, one row per chunk plus a merged row
per (camera, stream, t)) takes ~15,500 chunks/s on this machine: behind it the replay figure is
the receiver's, not the agent's. The null receiver checks almost nothing. This one sits between:
per batch it

- gunzips the body and decodes it with msgspec into typed structs (schema, gateway, first_seq,
  last_seq, and per chunk only seq, seq_end, camera, stream, t, rev, count: the rest of each
  chunk is skipped by the decoder, not built into Python objects); a missing or mistyped field
  is a 400, as in the reference receiver;
- checks the schema and that the chunks tile first_seq..last_seq exactly, in order (seq_end >=
  seq for a compacted chunk): otherwise 400 with the reference receiver's message;
- deduplicates by (gateway, seq) against every seq range it has accepted (a set of disjoint
  intervals per gateway: one interval while the agent sends in order), and counts new chunks,
  their messages (sum of `count`), late deltas (rev > 0), gaps, out-of-order and duplicate
  chunks as the reference receiver does (the first batch of a gateway starts its run anywhere).

It answers 200 {"stored": new, "duplicates": dup} like the reference receiver. Nothing is kept
per chunk, so memory stays flat whatever the backlog.

    python -m bench.fast_receiver --port 8099
    python -m bench.fast_receiver --self-test      # the bookkeeping vs
                                                   # tests/forward/test_receiver.py
    GET /_stats -> {"chunks", "messages", "late_deltas", "batches", "bad", "bytes", "first_at",
                    "last_at", "gateways": {gw: {"max_seq", "gaps", "out_of_order",
                    "duplicates", "ranges"}}}
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec

SCHEMA = "edge-agent/v1"
MAX_BODY_BYTES = 64 * 1024 * 1024


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
        self.seqs = Seqs()
        self.max_seq = 0
        self.gaps = 0
        self.out_of_order = 0
        self.duplicates = 0


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gateways: dict[str, Gateway] = {}
        self.chunks = 0
        self.messages = 0
        self.late_deltas = 0
        self.batches = 0
        self.bad = 0
        self.bytes = 0
        self.first_at: float | None = None  # wall time of the first and last accepted batch
        self.last_at: float | None = None

    def ingest(self, b: BatchHead) -> tuple[int, int]:
        """Count a validated batch; (new chunks, duplicate chunks). Called under the lock."""
        gw = self.gateways.get(b.gateway)
        if gw is None:
            gw = self.gateways[b.gateway] = Gateway()
        seqs = gw.seqs
        max_seq = gw.max_seq
        new = dup = messages = late = 0
        if not seqs.hi or b.first_seq > seqs.hi[-1]:
            # The usual case: everything is past what was accepted. Same bookkeeping as the
            # reference receiver's per-chunk loop, without the per-chunk lookups.
            if max_seq and b.first_seq > max_seq + 1:
                gw.gaps += 1
            new = len(b.chunks)
            for c in b.chunks:
                messages += c.count
                late += c.rev > 0
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
        gw.max_seq = max_seq
        gw.duplicates += dup
        self.chunks += new
        self.messages += messages
        self.late_deltas += late
        self.batches += 1
        return new, dup

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


def validate(b: BatchHead) -> None:
    """The reference receiver's checks (agent/sim/cloud.py _validate), on decoded structs."""
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the reply goes out in two writes: no delayed-ACK stall
    state: State

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
            batch = _decode(body)
            validate(batch)
        except (OSError, EOFError, zlib.error, ValueError, msgspec.DecodeError) as e:
            with st.lock:
                st.bad += 1
            self._reply(400, {"error": f"bad batch: {e}"})
            return
        with st.lock:
            new, dup = st.ingest(batch)
            st.bytes += len(raw)
            st.last_at = time.time()
            if st.first_at is None:
                st.first_at = st.last_at
        self._reply(200, {"stored": new, "duplicates": dup})


def self_test() -> None:
    """tests/forward/test_receiver.py's bookkeeping scenarios and the refusals, in process
    (bench/ is outside the test suite): raises AssertionError on a difference from the reference."""

    def chunk(seq: int, t: int, seq_end: int | None = None, rev: int = 0) -> dict[str, Any]:
        c: dict[str, Any] = {"seq": seq, "camera": "cam-1", "stream": "det", "t": t,
                             "width_s": 1, "rev": rev, "count": 1}  # fmt: skip
        if seq_end is not None:
            c["seq_end"] = seq_end
        return c

    def batch(*cs: dict[str, Any], **over: Any) -> BatchHead:
        doc = {"schema": SCHEMA, "gateway": "gw", "first_seq": cs[0]["seq"] if cs else 1,
               "last_seq": cs[-1].get("seq_end", cs[-1]["seq"]) if cs else 1,
               "chunks": list(cs), **over}  # fmt: skip
        b = _decode(json.dumps(doc).encode())
        validate(b)
        return b

    s = State()
    assert s.ingest(batch(chunk(1, 1), chunk(2, 2))) == (2, 0)
    assert s.ingest(batch(chunk(1, 1), chunk(2, 2))) == (0, 2)
    s.ingest(batch(chunk(5, 5)))
    s.ingest(batch(chunk(3, 3)))
    g = s.stats()["gateways"]["gw"]
    assert (g["duplicates"], g["gaps"], g["out_of_order"], g["max_seq"]) == (2, 1, 1, 5), g
    s = State()
    start = 1_764_126_000_000_001
    assert s.ingest(batch(chunk(start, 10, start + 4), chunk(start + 5, 20))) == (2, 0)
    s.ingest(batch(chunk(start + 6, 30, start + 9)))
    s.ingest(batch(chunk(start + 10, 40, rev=1)))
    g = s.stats()["gateways"]["gw"]
    assert (g["gaps"], g["out_of_order"], g["duplicates"], g["max_seq"]) == (0, 0, 0, start + 10)
    assert (s.messages, s.late_deltas) == (4, 1)
    s.ingest(batch(chunk(start + 12, 50)))
    assert s.stats()["gateways"]["gw"]["gaps"] == 1
    assert s.ingest(batch(chunk(start + 7, 30))) == (0, 1)  # inside a compacted range: a dup
    bad: dict[str, Any]
    for bad in (
        {"chunks": [chunk(1, 1), chunk(3, 3)], "last_seq": 3},  # not tiling
        {"chunks": [chunk(1, 1)], "last_seq": 2},  # last_seq beyond the chunks
        {"chunks": [chunk(2, 1, seq_end=1)], "first_seq": 2, "last_seq": 1},  # seq_end < seq
        {"chunks": [chunk(1, 1)], "schema": "v0"},
        {"chunks": []},
        {"chunks": [{"seq": 1}]},  # a chunk without camera, stream, t, rev, count
    ):
        doc = {"schema": SCHEMA, "gateway": "gw", "first_seq": 1, "last_seq": 1, **bad}
        try:
            validate(_decode(json.dumps(doc).encode()))
        except (ValueError, msgspec.DecodeError):
            continue
        raise AssertionError(f"not refused: {bad}")


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.fast_receiver",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--port", type=int)
    p.add_argument("--self-test", action="store_true", help="check the bookkeeping, then exit")
    args = p.parse_args()
    if args.self_test:
        self_test()
        print("fast_receiver self-test: ok")
        return 0
    if args.port is None:
        p.error("--port is required")
    Handler.state = State()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
