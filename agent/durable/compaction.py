"""Bounded disk: plans that shrink the outbox without losing a count.

All statistics are mergeable, so the 1-second chunks of a stretch of the outbox can be merged
per (camera, stream) into 10-second chunks, and those into 60-second ones. Pure: rows in, rows
out; agent/durable/store.py applies the result over the same seq range (G8).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from agent.core.errors import BadChunk
from agent.core.model import Chunk, decode_chunk, encode_chunk, is_finite

LEVELS = ((1, 10), (10, 60))

Row = tuple[int, int, float, bytes]  # seq, seq_end, created_at, body


def compact_range(rows: list[Row], *, coarser: int) -> list[tuple[float, bytes]] | None:
    """Merge the chunks of `rows` narrower than `coarser` seconds into `coarser`-second chunks
    per (camera, stream); other rows are kept as they are. Returns the new rows (created_at,
    body) in the order of their first member, or None when nothing would shrink.

    A row whose body cannot be decoded is kept unchanged: compaction never loses a row.
    """
    out: list[tuple[float, bytes] | list[tuple[float, Chunk, bytes]]] = []
    groups: dict[tuple[str, str, int], list[tuple[float, Chunk, bytes]]] = {}
    merged_away = 0
    for _seq, _end, created, body in rows:
        try:
            c = decode_chunk(body)
        except BadChunk:
            # Not a valid chunk: kept as it is, never merged (compaction never loses a row).
            out.append((created, body))
            continue
        if c.width_s >= coarser:
            out.append((created, body))
            continue
        key = (c.camera, c.stream, c.t // coarser * coarser)
        members = groups.get(key)
        if members is None:
            members = groups[key] = []
            out.append(members)
        else:
            merged_away += 1
        members.append((created, c, body))
    if not merged_away:
        return None
    result: list[tuple[float, bytes]] = []
    for item in out:
        if isinstance(item, tuple):
            result.append(item)
            continue
        if len(item) == 1:
            result.append((item[0][0], item[0][2]))
            continue
        first = item[0][1]
        merged = Chunk(
            first.camera,
            first.stream,
            first.t // coarser * coarser,
            coarser,
            rev=min(c.rev for _, c, _ in item),
        )
        for _, c, _ in item:
            merged.merge(c)
        if not is_finite(merged):
            # The group's sums would overflow: leave its chunks as they are.
            result.extend((created, body) for created, _, body in item)
            continue
        merged.flags.add("compacted")
        result.append((min(created for created, _, _ in item), encode_chunk(merged)))
    return result


class _Count(msgspec.Struct):
    count: int = 0


_count_decoder = msgspec.json.Decoder(_Count)


def counted_messages(bodies: Iterable[bytes]) -> int:
    """How many messages these chunk bodies hold (for batch and drop accounting); a body that
    does not say: 0. Reads only the `count` field: every batch cut runs this over its chunks,
    and decoding them whole was most of a replay's CPU."""
    total = 0
    decode = _count_decoder.decode
    for body in bodies:
        try:
            n = decode(body).count
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            continue
        if n > 0:
            total += n
    return total
