"""Bounded disk: plans that shrink the outbox without losing a count.

All statistics are mergeable, so the oldest 1-second chunks of a (camera, stream) can be merged
into one 10-second chunk, and 10-second chunks into 60-second ones. Pure: rows in, plan out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.model import BadChunk, Chunk, decode_chunk, encode_chunk, is_finite

LEVELS = ((1, 10), (10, 60))


@dataclass
class CompactionPlan:
    """Rewrite `updates` (seq, new body) and delete `deletes`; the counts stay the same.

    `quarantine`: seqs whose stored body is not a valid chunk (see `decode_chunk`); left out of
    the plan, for the caller to move to the dead letters.
    """

    updates: list[tuple[int, bytes]] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)
    quarantine: list[int] = field(default_factory=list)


def plan_compaction(
    rows: Iterable[tuple[int, bytes]], *, width: int, coarser: int
) -> CompactionPlan:
    """Merge chunks of `width` seconds into `coarser`-second chunks per (camera, stream).

    The merged chunk keeps the smallest seq of its group (a seq not yet sent, so none is
    reused), which keeps the outbox in order.
    """
    plan = CompactionPlan()
    groups: dict[tuple[str, str, int], list[tuple[int, Chunk]]] = {}
    for seq, body in rows:
        try:
            c = decode_chunk(body)
        except BadChunk:
            plan.quarantine.append(seq)
            continue
        if c.width_s != width:
            continue
        key = (c.camera, c.stream, c.t // coarser * coarser)
        groups.setdefault(key, []).append((seq, c))
    for (camera, stream, t), members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda m: m[0])
        merged = Chunk(camera, stream, t, coarser, rev=min(c.rev for _, c in members))
        for _, c in members:
            merged.merge(c)
        if not is_finite(merged):
            continue  # the sums of the group overflow: leave its chunks as they are
        merged.flags.add("compacted")
        plan.updates.append((members[0][0], encode_chunk(merged)))
        plan.deletes.extend(seq for seq, _ in members[1:])
    return plan


def counted_messages(bodies: Iterable[bytes]) -> int:
    """How many messages these chunk bodies hold (for drop accounting); invalid bodies hold 0."""
    total = 0
    for body in bodies:
        try:
            total += decode_chunk(body).count
        except BadChunk:
            continue
    return total
