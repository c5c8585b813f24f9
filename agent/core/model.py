"""Records that travel through the pipeline: the mergeable per-window Chunk and its wire form.

A Chunk holds the statistics of one (camera, stream, window start, rev). Every statistic is
mergeable, so late deltas (rev > 0) and coarser windows are sums of chunks.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, NotRequired, TypedDict

import msgspec

from agent.core.errors import BadBatch, BadChunk
from agent.core.text import rfc3339_ms

SCHEMA = "edge-agent/v1"
OTHER = "__other__"
MAX_CATEGORY_LEN = 64


class NumStats:
    """n, sum, sum of squares, min, max and the value with the greatest event time."""

    __slots__ = ("last", "last_t", "max", "min", "n", "sum", "sumsq")

    def __init__(self) -> None:
        self.n = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.last = 0.0
        self.last_t = -math.inf

    def add(self, value: float, event_t: float) -> bool:
        """Add one value; False, and nothing changed, when `sum` or `sumsq` would overflow."""
        total = self.sum + value
        total_sq = self.sumsq + value * value
        if not (math.isfinite(total) and math.isfinite(total_sq)):
            return False
        self.n += 1
        self.sum = total
        self.sumsq = total_sq
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        # Ties on event time go to the larger value so the result does not depend on arrival order.
        if event_t > self.last_t or (event_t == self.last_t and value > self.last):
            self.last_t = event_t
            self.last = value
        return True

    def merge(self, other: NumStats) -> None:
        self.n += other.n
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if other.last_t > self.last_t or (other.last_t == self.last_t and other.last > self.last):
            self.last_t = other.last_t
            self.last = other.last

    def to_wire(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "sum": self.sum,
            "sumsq": self.sumsq,
            "min": self.min,
            "max": self.max,
            "last": self.last,
            "last_t": self.last_t,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> NumStats:
        s = cls()
        s.n = int(d["n"])
        s.sum = float(d["sum"])
        s.sumsq = float(d["sumsq"])
        s.min = float(d["min"])
        s.max = float(d["max"])
        s.last = float(d["last"])
        s.last_t = float(d.get("last_t", -math.inf))
        return s


class Chunk:
    """Statistics of one (camera, stream, t, rev) window."""

    __slots__ = (
        "camera",
        "cat",
        "count",
        "event_first",
        "event_last",
        "flags",
        "num",
        "recv_first",
        "recv_last",
        "rev",
        "skew_sum",
        "stream",
        "t",
        "width_s",
    )

    def __init__(self, camera: str, stream: str, t: int, width_s: int, rev: int = 0) -> None:
        self.camera = camera
        self.stream = stream
        self.t = t
        self.width_s = width_s
        self.rev = rev
        self.count = 0
        self.num: dict[str, NumStats] = {}
        self.cat: dict[str, dict[str, int]] = {}
        self.event_first = math.inf
        self.event_last = -math.inf
        self.recv_first = math.inf
        self.recv_last = -math.inf
        self.skew_sum = 0.0
        self.flags: set[str] = set()

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.camera, self.stream, self.t)

    def add_times(self, event_t: float, recv_t: float) -> None:
        self.count += 1
        if event_t < self.event_first:
            self.event_first = event_t
        if event_t > self.event_last:
            self.event_last = event_t
        if recv_t < self.recv_first:
            self.recv_first = recv_t
        if recv_t > self.recv_last:
            self.recv_last = recv_t
        self.skew_sum += event_t - recv_t

    def add_number(self, field: str, value: float, event_t: float) -> bool:
        """False when the value would make a sum non-finite (the field is then left as it was)."""
        stats = self.num.get(field)
        if stats is not None:
            return stats.add(value, event_t)
        stats = NumStats()
        if not stats.add(value, event_t):
            return False
        self.num[field] = stats
        return True

    def add_category(self, field: str, value: str, max_categories: int) -> None:
        counts = self.cat.get(field)
        if counts is None:
            counts = self.cat[field] = {}
        if value in counts:
            counts[value] += 1
        elif len(counts) - (OTHER in counts) < max_categories:
            counts[value] = 1
        else:
            counts[OTHER] = counts.get(OTHER, 0) + 1

    def merge(self, other: Chunk) -> None:
        """Add `other`'s statistics into this chunk (same key; any rev)."""
        self.count += other.count
        for f, s in other.num.items():
            mine = self.num.get(f)
            if mine is None:
                mine = self.num[f] = NumStats()
            mine.merge(s)
        for f, counts in other.cat.items():
            target = self.cat.setdefault(f, {})
            for v, c in counts.items():
                target[v] = target.get(v, 0) + c
        self.event_first = min(self.event_first, other.event_first)
        self.event_last = max(self.event_last, other.event_last)
        self.recv_first = min(self.recv_first, other.recv_first)
        self.recv_last = max(self.recv_last, other.recv_last)
        self.skew_sum += other.skew_sum
        self.flags |= other.flags

    def to_wire(self) -> dict[str, Any]:
        """The chunk as in the wire format, without `seq` (the outbox assigns it)."""
        return {
            "camera": self.camera,
            "stream": self.stream,
            "t": self.t,
            "width_s": self.width_s,
            "rev": self.rev,
            "count": self.count,
            "num": {f: s.to_wire() for f, s in self.num.items()},
            "cat": self.cat,
            "event_first": self.event_first,
            "event_last": self.event_last,
            "recv_first": self.recv_first,
            "recv_last": self.recv_last,
            "skew_s": round(self.skew_sum / self.count, 6) if self.count else 0.0,
            "flags": sorted(self.flags),
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Chunk:
        c = cls(str(d["camera"]), str(d["stream"]), int(d["t"]), int(d["width_s"]), int(d["rev"]))
        c.count = int(d["count"])
        c.num = {f: NumStats.from_wire(s) for f, s in d.get("num", {}).items()}
        c.cat = {f: {str(k): int(v) for k, v in vs.items()} for f, vs in d.get("cat", {}).items()}
        c.event_first = float(d["event_first"])
        c.event_last = float(d["event_last"])
        c.recv_first = float(d["recv_first"])
        c.recv_last = float(d["recv_last"])
        c.skew_sum = float(d.get("skew_s", 0.0)) * c.count
        c.flags = set(d.get("flags", ()))
        return c


_encoder = msgspec.json.Encoder()


# The shape a stored body must have. msgspec refuses null, and numbers beyond the float range,
# where a float is expected; `Chunk.from_wire` then reads the plain dicts it yields. Ints stay
# within SQLite's 64 bits.
_I64 = 2**63 - 1
_Count = Annotated[int, msgspec.Meta(ge=0, le=_I64)]


class _WireNum(TypedDict):
    n: Annotated[int, msgspec.Meta(ge=1, le=_I64)]
    sum: float
    sumsq: float
    min: float
    max: float
    last: float
    last_t: float


class _WireChunk(TypedDict):
    camera: str
    stream: str
    t: Annotated[int, msgspec.Meta(ge=-_I64, le=_I64)]
    width_s: Annotated[int, msgspec.Meta(ge=1, le=_I64)]
    rev: _Count
    count: _Count
    num: NotRequired[dict[str, _WireNum]]
    cat: NotRequired[dict[str, dict[str, _Count]]]
    event_first: float
    event_last: float
    recv_first: float
    recv_last: float
    skew_s: NotRequired[float]
    flags: NotRequired[list[str]]


_chunk_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_WireChunk)


def is_finite(chunk: Chunk) -> bool:
    """True when every number the chunk puts on the wire is finite (JSON has no inf or NaN)."""
    values = [chunk.event_first, chunk.event_last, chunk.recv_first, chunk.recv_last]
    values.append(chunk.skew_sum)
    for s in chunk.num.values():
        values += (s.sum, s.sumsq, s.min, s.max, s.last, s.last_t)
    return all(math.isfinite(v) for v in values)


def decode_chunk(body: bytes) -> Chunk:
    """A stored chunk body as a Chunk; raises BadChunk, and nothing else, when it is not one."""
    try:
        chunk = Chunk.from_wire(_chunk_decoder.decode(body))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadChunk(f"not a valid chunk: {e}") from None
    if not is_finite(chunk):
        raise BadChunk("not a valid chunk: a number is not finite")
    return chunk


def encode_chunk(chunk: Chunk) -> bytes:
    """JSON bytes of the chunk's wire form (no seq)."""
    return _encoder.encode(chunk.to_wire())


def with_seq(seq: int, body: bytes, seq_end: int | None = None) -> bytes:
    """Splice `"seq": n` (and `"seq_end": m` for a compacted chunk standing for the seqs n..m)
    in front of a stored chunk body without re-encoding it."""
    head = b'{"seq":' + str(seq).encode() + b","
    if seq_end is not None and seq_end != seq:
        head += b'"seq_end":' + str(seq_end).encode() + b","
    return head + body[1:]


def encode_batch(gateway_id: str, rows: list[tuple[int, int, bytes]], *, sent_at: float) -> bytes:
    """The JSON body of a batch of (seq, seq_end, body) rows, splicing the stored chunk bodies
    without re-encoding them. `first_seq`..`last_seq` is the seq range the chunks cover."""
    stamp = rfc3339_ms(sent_at)
    head = (
        f'{{"schema":"{SCHEMA}","gateway":"{gateway_id}","first_seq":{rows[0][0]},'
        f'"last_seq":{rows[-1][1]},"sent_at":"{stamp}","chunks":['
    ).encode()
    return head + b",".join(with_seq(s, b, e) for s, e, b in rows) + b"]}"


# The batch as it travels (docs/design.md, "Wire format"): the one definition the agent's
# reference receiver and edge-ingest decode with. Strings are bounded and free of NUL (which
# PostgreSQL's text refuses); every number is finite (msgspec refuses JSON numbers beyond the
# float range, and JSON has no inf or NaN).
MAX_NAME_LEN = 256
# (NUL is refused by _check_names, in the same pass as the length in bytes: a regex on every
# name cost as much as the rest of the decoding.)
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LEN)]
_Seq = Annotated[int, msgspec.Meta(ge=0, le=_I64)]


# A count on the wire: far above any camera's second (or minute), far below where a gateway's
# running totals in the cloud could overflow 64 bits.
MAX_WIRE_COUNT = 2**40
_WireCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_WIRE_COUNT)]


class WireNum(msgspec.Struct, forbid_unknown_fields=False):
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_WIRE_COUNT)]
    sum: float
    sumsq: float
    min: float
    max: float
    last: float
    last_t: float = -math.inf


class WireChunk(msgspec.Struct):
    seq: _Seq
    camera: _Name
    stream: _Name
    # 1901..3058: far wider than any clock the agent lets through, inside PostgreSQL's range.
    t: Annotated[int, msgspec.Meta(ge=-(2**31), le=2**35)]
    width_s: Annotated[int, msgspec.Meta(ge=1, le=86400)]
    rev: _Count
    count: _WireCount
    event_first: float
    event_last: float
    recv_first: float
    recv_last: float
    seq_end: _Seq | None = None
    num: dict[_Name, WireNum] = {}
    cat: dict[_Name, dict[Annotated[str, msgspec.Meta(max_length=MAX_NAME_LEN)], _WireCount]] = {}
    skew_s: float = 0.0
    flags: list[str] = []


class WireBatch(msgspec.Struct):
    schema: str
    gateway: _Name
    first_seq: _Seq
    last_seq: _Seq
    chunks: list[WireChunk]
    sent_at: str = ""

    @property
    def key(self) -> str:
        """The Idempotency-Key the agent sends with this batch."""
        return f"{self.gateway}:{self.first_seq}-{self.last_seq}"


_batch_decoder = msgspec.json.Decoder(WireBatch)


def decode_batch(body: bytes) -> WireBatch:
    """A batch body (not compressed) as a WireBatch; raises BadBatch, naming what is wrong and
    where, when it is not one: its shape, its schema, or chunks that do not tile
    `first_seq..last_seq` contiguously and in order (G8)."""
    try:
        batch = _batch_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadBatch(str(e)) from None
    if batch.schema != SCHEMA:
        raise BadBatch(f"schema must be {SCHEMA!r}, got {batch.schema[:64]!r} - at `$.schema`")
    if not batch.chunks:
        raise BadBatch("chunks must not be empty - at `$.chunks`")
    expect = batch.first_seq
    for i, c in enumerate(batch.chunks):
        end = c.seq if c.seq_end is None else c.seq_end
        if c.seq != expect or end < c.seq:
            raise BadBatch(
                f"seqs must tile first_seq..last_seq contiguously and in order: expected seq"
                f" {expect}, got {c.seq}..{end} - at `$.chunks[{i}]`"
            )
        expect = end + 1
    if expect != batch.last_seq + 1:
        raise BadBatch(
            f"seqs must tile first_seq..last_seq: the chunks end at {expect - 1}, last_seq is"
            f" {batch.last_seq} - at `$.last_seq`"
        )
    _check_names(batch)
    for i, c in enumerate(batch.chunks):
        for f, s in c.num.items():
            if not all(math.isfinite(v) for v in (s.sum, s.sumsq, s.min, s.max, s.last)):
                raise BadBatch(f"a number is not finite - at `$.chunks[{i}].num.{f}`")
    return batch


def _check_names(batch: WireBatch) -> None:
    """Every name free of NUL (PostgreSQL's text refuses it) and, with every category value,
    at most MAX_NAME_LEN bytes in UTF-8 (msgspec counts characters): together they make one
    index key, which PostgreSQL caps at 2704 bytes."""

    def bad(text: str) -> str | None:
        if "\x00" in text:
            return "holds NUL"
        if len(text) > MAX_NAME_LEN // 4 and len(text.encode()) > MAX_NAME_LEN:
            return f"over {MAX_NAME_LEN} bytes in UTF-8"
        return None

    why = bad(batch.gateway)
    if why:
        raise BadBatch(f"a name {why} - at `$.gateway`")
    for i, c in enumerate(batch.chunks):
        for where, names in (("camera", (c.camera,)), ("stream", (c.stream,)),
                             ("num", c.num), ("cat", c.cat)):  # fmt: skip
            for name in names:
                why = bad(name)
                if why:
                    raise BadBatch(f"a name {why} - at `$.chunks[{i}].{where}`")
        for values in c.cat.values():
            for v in values:
                if len(v) > MAX_NAME_LEN // 4 and len(v.encode()) > MAX_NAME_LEN:
                    raise BadBatch(
                        f"a category value over {MAX_NAME_LEN} bytes - at `$.chunks[{i}].cat`"
                    )
