"""Bounded disk: plans that shrink the outbox without losing a count.

All statistics are mergeable, so the oldest 1-second chunks of a (camera, stream) can be merged
into one 10-second chunk, and 10-second chunks into 60-second ones. Pure: rows in, plan out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from agent.model import Chunk, encode_chunk

LEVELS = ((1, 10), (10, 60))


@dataclass
class CompactionPlan:
    """Rewrite `updates` (seq, new body) and delete `deletes`; the counts stay the same."""

    updates: list[tuple[int, bytes]] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)


def plan_compaction(
    rows: Iterable[tuple[int, bytes]], *, width: int, coarser: int
) -> CompactionPlan:
    """Merge chunks of `width` seconds into `coarser`-second chunks per (camera, stream).

    The merged chunk keeps the smallest seq of its group (a seq not yet sent, so none is
    reused), which keeps the outbox in order.
    """
    groups: dict[tuple[str, str, int], list[tuple[int, Chunk]]] = {}
    for seq, body in rows:
        doc = msgspec.json.decode(body)
        if doc.get("width_s") != width:
            continue
        c = Chunk.from_wire(doc)
        key = (c.camera, c.stream, c.t // coarser * coarser)
        groups.setdefault(key, []).append((seq, c))
    plan = CompactionPlan()
    for (camera, stream, t), members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda m: m[0])
        merged = Chunk(camera, stream, t, coarser, rev=min(c.rev for _, c in members))
        for _, c in members:
            merged.merge(c)
        merged.flags.add("compacted")
        plan.updates.append((members[0][0], encode_chunk(merged)))
        plan.deletes.extend(seq for seq, _ in members[1:])
    return plan


def counted_messages(bodies: Iterable[bytes]) -> int:
    """How many messages these chunk bodies hold (for drop accounting)."""
    return sum(int(msgspec.json.decode(b)["count"]) for b in bodies)
