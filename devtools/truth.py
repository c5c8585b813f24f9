"""Ground truth: what the cloud's merged table must hold, computed from the published messages.

Deliberately independent of the agent's own parsing and aggregation code, so that a bug there
shows up as a difference here.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.model import Chunk

NUMERIC = ("conf", "level", "temp_c", "fps")
CATEGORICAL = ("cls", "zone", "status")


@dataclass
class Expected:
    count: int = 0
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    cats: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )


def _seconds(ts: float | int) -> float:
    # The simulator sends float seconds or integer milliseconds.
    return ts / 1000.0 if ts > 1e11 else float(ts)


def expected_table(
    records: Iterable[Mapping[str, Any]], window_s: int = 1
) -> dict[tuple[str, str, int], Expected]:
    table: dict[tuple[str, str, int], Expected] = defaultdict(Expected)
    for r in records:
        if r.get("malformed"):
            continue
        _, camera, stream = r["topic"].rsplit("/", 2)
        doc = json.loads(r["payload"])
        t = math.floor(_seconds(doc["ts"]) / window_s) * window_s
        e = table[(camera, stream, t)]
        e.count += 1
        for f in NUMERIC:
            if f in doc:
                e.sums[f] += doc[f]
        for f in CATEGORICAL:
            if f in doc:
                e.cats[f][str(doc[f])] += 1
    return dict(table)


@dataclass
class Comparison:
    expected_messages: int
    received_messages: int
    missing: int
    duplicated: int
    mismatched_rows: list[str]

    @property
    def exact(self) -> bool:
        return not self.missing and not self.duplicated and not self.mismatched_rows


def compare(
    expected: Mapping[tuple[str, str, int], Expected], merged: Mapping[tuple[str, str, int], Chunk]
) -> Comparison:
    missing = duplicated = 0
    bad: list[str] = []
    for key in expected.keys() | merged.keys():
        e = expected.get(key)
        m = merged.get(key)
        want = e.count if e else 0
        got = m.count if m else 0
        if got < want:
            missing += want - got
        elif got > want:
            duplicated += got - want
        if e is None or m is None or want != got:
            if len(bad) < 20:
                bad.append(f"{key}: expected {want} messages, cloud has {got}")
            continue
        for f, total in e.sums.items():
            s = m.num.get(f)
            if s is None or not math.isclose(s.sum, total, rel_tol=1e-9, abs_tol=1e-6):
                bad.append(f"{key}: sum of {f} expected {total}, cloud has {s.sum if s else None}")
        for f, counts in e.cats.items():
            if dict(counts) != m.cat.get(f, {}):
                bad.append(
                    f"{key}: categories of {f} expected {dict(counts)}, cloud has {m.cat.get(f)}"
                )
    return Comparison(
        expected_messages=sum(e.count for e in expected.values()),
        received_messages=sum(m.count for m in merged.values()),
        missing=missing,
        duplicated=duplicated,
        mismatched_rows=bad,
    )


def compare_per_stream(
    expected: Mapping[tuple[str, str, int], Expected], merged: Mapping[tuple[str, str, int], Chunk]
) -> Comparison:
    """Like compare(), per (camera, stream) over the whole run: for coarsened (compacted) data."""
    e2: dict[tuple[str, str, int], Expected] = defaultdict(Expected)
    for (camera, stream, _), e in expected.items():
        target = e2[(camera, stream, 0)]
        target.count += e.count
        for f, v in e.sums.items():
            target.sums[f] += v
        for f, counts in e.cats.items():
            for k, n in counts.items():
                target.cats[f][k] += n
    m2: dict[tuple[str, str, int], Chunk] = {}
    for (camera, stream, _), c in merged.items():
        key = (camera, stream, 0)
        if key in m2:
            m2[key].merge(c)
        else:
            m2[key] = Chunk(camera, stream, 0, 1)
            m2[key].merge(c)
    return compare(e2, m2)
