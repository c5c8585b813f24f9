"""A batch's chunks as the rows edge-ingest writes: merged by key and sorted, in Python.

Pure: a decoded batch in, three sorted row lists out. Merging first matters twice: one
`INSERT … ON CONFLICT DO UPDATE` statement may not touch the same key twice (a batch can carry
a window's rev 0 and its late delta), and rows written in key order take their locks in one
order. The merge is the agent's own (agent.core.model.NumStats): count, n, sum and sumsq add;
min and max keep the extremes; `last` is the value with the greatest event time, ties to the
larger value, so the result does not depend on the order chunks arrive in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.core.model import WireChunk

# (camera, stream, t, width_s): one window of one camera's stream.
Key = tuple[str, str, int, int]
CountRow = tuple[str, str, int, int, int, int]  # key, count, revs
NumRow = tuple[str, str, int, int, str, int, float, float, float, float, float, float]
CatRow = tuple[str, str, int, int, str, str, int]  # key, field, value, count


@dataclass
class Rows:
    """What one batch writes: one row per window, per (window, numeric field) and per
    (window, categorical field, value), each list sorted by its key."""

    counts: list[CountRow] = field(default_factory=list)
    numeric: list[NumRow] = field(default_factory=list)
    categories: list[CatRow] = field(default_factory=list)
    messages: int = 0

    @property
    def total(self) -> int:
        return len(self.counts) + len(self.numeric) + len(self.categories)


def batch_rows(chunks: list[WireChunk]) -> Rows:
    """The merged, sorted rows of `chunks` (already validated: finite, bounded)."""
    counts: dict[Key, list[int]] = {}
    numeric: dict[tuple[str, str, int, int, str], list[float]] = {}
    cats: dict[tuple[str, str, int, int, str, str], int] = {}
    messages = 0
    for c in chunks:
        key = (c.camera, c.stream, c.t, c.width_s)
        messages += c.count
        have = counts.get(key)
        if have is None:
            counts[key] = [c.count, 1]
        else:
            have[0] += c.count
            have[1] += 1
        for f, s in c.num.items():
            nk = (*key, f)
            cur = numeric.get(nk)
            if cur is None:
                numeric[nk] = [s.n, s.sum, s.sumsq, s.min, s.max, s.last, s.last_t]
                continue
            cur[0] += s.n
            cur[1] += s.sum
            cur[2] += s.sumsq
            if s.min < cur[3]:
                cur[3] = s.min
            if s.max > cur[4]:
                cur[4] = s.max
            if s.last_t > cur[6] or (s.last_t == cur[6] and s.last > cur[5]):
                cur[5] = s.last
                cur[6] = s.last_t
        for f, values in c.cat.items():
            for v, n in values.items():
                if "\x00" in v:
                    # JSON allows NUL in a category value (a camera sent it; the agent keeps
                    # it); PostgreSQL's text does not. Stored as U+FFFD, never refused: a
                    # refusal would dead-letter the whole chunk.
                    v = v.replace("\x00", "\ufffd")
                ck = (*key, f, v)
                cats[ck] = cats.get(ck, 0) + n
    return Rows(
        counts=[(*k, v[0], v[1]) for k, v in sorted(counts.items())],
        numeric=[
            (*k, int(v[0]), v[1], v[2], v[3], v[4], v[5], v[6]) for k, v in sorted(numeric.items())
        ],
        categories=[(*k, n) for k, n in sorted(cats.items())],
        messages=messages,
    )
