"""Simulated gateways for edge-ingest: batches in the agent's wire format, sent as the agent
sends them, and the ground truth they add up to.

A `Gateway` cuts batches exactly as the agent's outbox does (contiguous seqs, one
Idempotency-Key per range, the same bytes on every retry: agent.core.model.encode_batch) from
seeded random chunks that reuse keys on purpose (a window's rev 0 and its late deltas, in one
batch and across batches), so additive merging is exercised. `Truth` adds up what was applied,
independently of edge-ingest's SQL, and `db_totals` reads the database's views to compare.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from agent.core.model import Chunk, NumStats, encode_batch, encode_chunk
from devtools.procs import HOST, Proc, free_port, port_open, wait_for

CATEGORIES = ("person", "car", "bike", "dog")


@dataclass(frozen=True)
class Batch:
    gateway: str
    first_seq: int
    last_seq: int
    body: bytes  # not compressed
    chunks: tuple[Chunk, ...]

    @property
    def key(self) -> str:
        return f"{self.gateway}:{self.first_seq}-{self.last_seq}"

    def request(self, token: str | None, *, gzipped: bool = True) -> tuple[bytes, dict[str, str]]:
        """The body and headers the agent's forwarder sends (gzip with mtime 0: the same bytes
        on every attempt)."""
        headers = {"Content-Type": "application/json", "Idempotency-Key": self.key}
        headers["User-Agent"] = "edge-agent/0.1.0"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        body = self.body
        if gzipped:
            body = gzip.compress(body, compresslevel=1, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return body, headers


@dataclass
class Gateway:
    """One gateway's outbox: `cut(n)` makes the next batch of n chunks."""

    gateway_id: str
    seed: int
    cameras: int = 8
    next_seq: int = 1
    # Today's midnight (UTC): inside the service's retention, so its maintenance at a start
    # never deletes what a test just sent (a fixed day would fall out of it as time passes).
    t0: int = field(default_factory=lambda: int(time.time()) // 86400 * 86400)
    _rng: random.Random = field(init=False)
    _t: int = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._t = self.t0

    def chunk(self) -> Chunk:
        r = self._rng
        camera = f"cam-{r.randrange(self.cameras):03d}"
        stream = r.choice(("detections", "health"))
        # Mostly the current second, sometimes a late delta of a recent one (rev > 0).
        late = r.random() < 0.2
        t = self._t - r.randrange(1, 30) if late else self._t
        if r.random() < 0.3:
            self._t += 1
        c = Chunk(camera, stream, t, 1, rev=r.randrange(1, 4) if late else 0)
        for _ in range(r.randrange(1, 6)):
            et = t + r.random()
            c.add_times(et, et + 0.05)
            c.add_number("conf", round(r.random(), 3), et)
            if stream == "detections":
                c.add_category("cls", r.choice(CATEGORIES), 16)
        return c

    def cut(self, n: int) -> Batch:
        chunks = tuple(self.chunk() for _ in range(n))
        rows = [
            (self.next_seq + i, self.next_seq + i, encode_chunk(c)) for i, c in enumerate(chunks)
        ]
        body = encode_batch(self.gateway_id, rows, sent_at=float(self._t))
        b = Batch(self.gateway_id, self.next_seq, self.next_seq + n - 1, body, chunks)
        self.next_seq += n
        return b

    def reset_outbox(self, jump: int) -> None:
        """The agent's outbox was deleted: a new file starts seqs further ahead."""
        self.next_seq += jump


@dataclass
class Totals:
    count: int = 0
    n: int = 0
    sum: float = 0.0
    cats: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Truth:
    """What the database must hold: every applied batch's chunks, added up per
    (gateway, camera, stream, t) in plain Python."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str, str, int], Totals] = defaultdict(Totals)
        self.batches = 0

    def apply(self, batch: Batch) -> None:
        self.batches += 1
        for c in batch.chunks:
            e = self.table[(batch.gateway, c.camera, c.stream, c.t)]
            e.count += c.count
            s = c.num.get("conf")
            if s is not None:
                e.n += s.n
                e.sum += s.sum
            for v, k in c.cat.get("cls", {}).items():
                e.cats[v] += k

    @property
    def messages(self) -> int:
        return sum(e.count for e in self.table.values())

    def differences(self, db: dict[tuple[str, str, str, int], Totals]) -> list[str]:
        """Every key where the database and the truth differ (sums to 1e-6 relative)."""
        out: list[str] = []
        for key in sorted(set(self.table) | set(db), key=repr):
            want, got = self.table.get(key, Totals()), db.get(key, Totals())
            same = (
                want.count == got.count
                and want.n == got.n
                and abs(want.sum - got.sum) <= 1e-6 * max(1.0, abs(want.sum))
                and {k: v for k, v in want.cats.items() if v}
                == {k: v for k, v in got.cats.items() if v}
            )
            if not same:
                out.append(f"{key}: want {_show(want)}, got {_show(got)}")
        return out


def _show(t: Totals) -> str:
    return f"count={t.count} n={t.n} sum={t.sum:.6f} cats={dict(t.cats)}"


async def db_totals(conn: Any) -> dict[tuple[str, str, str, int], Totals]:
    """The database's views, added up per (gateway, camera, stream, t) like `Truth`."""
    out: dict[tuple[str, str, str, int], Totals] = defaultdict(Totals)
    for r in await conn.fetch(
        "SELECT gateway, camera, stream, extract(epoch FROM t)::bigint AS t, count"
        " FROM edge_ingest.per_second"
    ):
        out[(r["gateway"], r["camera"], r["stream"], r["t"])].count += r["count"]
    for r in await conn.fetch(
        "SELECT gateway, camera, stream, extract(epoch FROM t)::bigint AS t, n, sum"
        " FROM edge_ingest.per_second_numeric WHERE field = 'conf'"
    ):
        e = out[(r["gateway"], r["camera"], r["stream"], r["t"])]
        e.n += r["n"]
        e.sum += r["sum"]
    for r in await conn.fetch(
        "SELECT gateway, camera, stream, extract(epoch FROM t)::bigint AS t, value, count"
        " FROM edge_ingest.per_second_categories WHERE field = 'cls'"
    ):
        out[(r["gateway"], r["camera"], r["stream"], r["t"])].cats[r["value"]] += r["count"]
    return dict(out)


class Ingest(Proc):
    """`edge-ingest serve` as a child process (its own process group: kill() is a SIGKILL of
    the service mid-whatever). The token is `token`; `url` is its POST /ingest."""

    def __init__(
        self,
        workdir: Path,
        dsn: str,
        *,
        port: int | None = None,
        pool: int = 4,
        token: str = "test-token",
        extra: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.token = token
        workdir.mkdir(parents=True, exist_ok=True)
        tokens = workdir / "tokens"
        tokens.write_text(token + "\n")
        args = [
            sys.executable, "-m", "edge_ingest.cli", "serve", "--dsn", dsn,
            "--listen", f"{HOST}:{self.port}", "--pool", str(pool), "--token-file", str(tokens),
        ]  # fmt: skip
        env = {
            "PATH": "/usr/bin:/bin",
            **{f"EDGE_INGEST__{k.upper()}": v for k, v in (extra or {}).items()},
        }
        super().__init__(args, workdir / f"ingest-{self.port}.log", env=env)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/ingest"

    def start(self) -> Self:
        super().start()
        wait_for(lambda: port_open(self.port) or not self.running, timeout_s=20, what="edge-ingest")
        if not self.running:
            raise RuntimeError(f"edge-ingest did not start:\n{self.log_text()}")
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ready(self) -> bool:
        status, _ = self.get("/readyz")
        return status == 200

    def wait_ready(self, timeout_s: float = 20) -> None:
        wait_for(self.ready, timeout_s=timeout_s, what="edge-ingest /readyz")

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics, e.g. metric("edge_ingest_batches_total", 'answer="200"')."""
        want = f"{name}{{{labels}}}" if labels else name
        for line in self.get("/metrics")[1].splitlines():
            head, _, value = line.rpartition(" ")
            if head == want:
                return float(value)
        raise KeyError(want)


def answer_doc(text: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(text)
    return doc


async def _load_views(dsn: str, gateway: str) -> dict[tuple[str, str, int], Chunk]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        out: dict[tuple[str, str, int], Chunk] = {}
        for r in await conn.fetch(
            "SELECT camera, stream, extract(epoch FROM t)::bigint AS t, width_s, count"
            " FROM edge_ingest.per_second WHERE gateway = $1",
            gateway,
        ):
            c = out.setdefault(
                (r["camera"], r["stream"], r["t"]),
                Chunk(r["camera"], r["stream"], r["t"], r["width_s"]),
            )
            c.count += r["count"]
        for r in await conn.fetch(
            "SELECT camera, stream, extract(epoch FROM t)::bigint AS t, field, n, sum, sumsq,"
            " min, max, last FROM edge_ingest.per_second_numeric WHERE gateway = $1",
            gateway,
        ):
            c = out.setdefault(
                (r["camera"], r["stream"], r["t"]), Chunk(r["camera"], r["stream"], r["t"], 1)
            )
            s = c.num.setdefault(r["field"], NumStats())
            s.n += r["n"]
            s.sum += r["sum"]
            s.sumsq += r["sumsq"]
            s.min = min(s.min, r["min"])
            s.max = max(s.max, r["max"])
        for r in await conn.fetch(
            "SELECT camera, stream, extract(epoch FROM t)::bigint AS t, field, value, count"
            " FROM edge_ingest.per_second_categories WHERE gateway = $1",
            gateway,
        ):
            c = out.setdefault(
                (r["camera"], r["stream"], r["t"]), Chunk(r["camera"], r["stream"], r["t"], 1)
            )
            cat = c.cat.setdefault(r["field"], {})
            cat[r["value"]] = cat.get(r["value"], 0) + r["count"]
        return out
    finally:
        await conn.close()


def load_views(dsn: str, gateway: str) -> dict[tuple[str, str, int], Chunk]:
    """The database's per-second views for one gateway as (camera, stream, t) -> Chunk: what
    devtools.truth.compare takes (the reference receiver's load_merged, from PostgreSQL)."""
    import asyncio

    return asyncio.run(_load_views(dsn, gateway))


def gateway_row(dsn: str, gateway: str) -> dict[str, Any]:
    """edge_ingest.gateways' row of one gateway ({} when it never sent)."""
    import asyncio

    import asyncpg

    async def fetch() -> dict[str, Any]:
        conn = await asyncpg.connect(dsn)
        try:
            r = await conn.fetchrow(
                "SELECT * FROM edge_ingest.gateways WHERE gateway = $1", gateway
            )
            return dict(r) if r is not None else {}
        finally:
            await conn.close()

    return asyncio.run(fetch())
