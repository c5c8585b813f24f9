"""The reference receiver's bookkeeping: dedup by (gateway, seq), gaps, out-of-order, rev merge;
and the replay benchmark's fast receiver (bench/fast_receiver.py) held to the same scenarios."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import msgspec
import pytest

from agent.core.model import Chunk
from agent.sim.cloud import Store, _validate, load_merged
from bench.fast_receiver import State, decode_batch


class Receiver(Protocol):
    def ingest(self, batch: dict[str, Any]) -> tuple[int, int]: ...
    def stats(self) -> dict[str, Any]: ...


class Fast:
    """bench/fast_receiver.py's bookkeeping behind the reference Store's interface."""

    def __init__(self) -> None:
        self.state = State()

    def ingest(self, batch: dict[str, Any]) -> tuple[int, int]:
        return self.state.ingest(decode_batch(json.dumps(batch).encode()))

    def stats(self) -> dict[str, Any]:
        return self.state.stats()


@pytest.fixture(params=["reference", "fast"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Receiver:
    return Store(tmp_path / "c.sqlite3") if request.param == "reference" else Fast()


def chunk(seq: int, t: int = 100, rev: int = 0, count: int = 1) -> dict[str, Any]:
    c = Chunk("cam-1", "det", t, 1, rev)
    for i in range(count):
        c.add_times(t + 0.1 * i, t + 0.1 * i)
        c.add_category("cls", "car", 8)
    return {"seq": seq, **c.to_wire()}


def batch(*chunks: dict[str, Any]) -> dict[str, Any]:
    return {"schema": "edge-agent/v1", "gateway": "gw", "first_seq": chunks[0]["seq"],
            "last_seq": chunks[-1].get("seq_end", chunks[-1]["seq"]),
            "chunks": list(chunks)}  # fmt: skip


def test_duplicates_gaps_and_out_of_order_are_reported(receiver: Receiver) -> None:
    s = receiver
    assert s.ingest(batch(chunk(1, t=1), chunk(2, t=2))) == (2, 0)
    assert s.ingest(batch(chunk(1, t=1), chunk(2, t=2))) == (0, 2)
    s.ingest(batch(chunk(5, t=5)))
    s.ingest(batch(chunk(3, t=3)))
    gw = s.stats()["gateways"]["gw"]
    assert gw["duplicates"] == 2 and gw["gaps"] == 1 and gw["out_of_order"] == 1
    assert gw["max_seq"] == 5


def test_revs_merge_into_one_row(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite3"
    s = Store(db)
    s.ingest(batch(chunk(1, rev=0, count=3)))
    s.ingest(batch(chunk(2, rev=1, count=2)))
    s.ingest(batch(chunk(3, rev=0, count=1)))  # a second rev 0 is reported
    merged = load_merged(db)
    assert merged[("cam-1", "det", 100)].count == 6
    assert merged[("cam-1", "det", 100)].cat["cls"] == {"car": 6}
    assert s.stats()["gateways"]["gw"]["rev0_repeats"] == 1
    assert s.stats()["messages"] == 6


def test_first_seq_anywhere_and_compacted_ranges_are_not_gaps(receiver: Receiver) -> None:
    """A gateway's first batch starts its seq run wherever it starts (a new outbox starts at the
    wall-clock floor); a compacted chunk declares the seqs it stands for (seq..seq_end)."""
    s = receiver
    start = 1_764_126_000_000_001
    compacted = {**chunk(start, t=10), "seq_end": start + 4}
    b = batch(compacted, chunk(start + 5, t=20))
    assert b["last_seq"] == start + 5
    assert s.ingest(b) == (2, 0)
    s.ingest(batch({**chunk(start + 6, t=30), "seq_end": start + 9}))
    s.ingest(batch(chunk(start + 10, t=40)))
    gw = s.stats()["gateways"]["gw"]
    assert gw["gaps"] == 0 and gw["out_of_order"] == 0 and gw["duplicates"] == 0
    assert gw["max_seq"] == start + 10
    assert s.stats()["messages"] == 4
    s.ingest(batch(chunk(start + 12, t=50)))  # start + 11 never arrived: a gap
    assert s.stats()["gateways"]["gw"]["gaps"] == 1


def test_fast_receiver_counts_late_deltas_and_seqs_inside_a_compacted_range() -> None:
    s = Fast()
    start = 1_764_126_000_000_001
    s.ingest(batch({**chunk(start + 6, t=30), "seq_end": start + 9}))
    s.ingest(batch(chunk(start + 10, t=40, rev=1)))
    assert s.ingest(batch(chunk(start + 7, t=30))) == (0, 1)  # inside a compacted range: a dup
    assert (s.state.messages, s.state.late_deltas) == (2, 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"chunks": [chunk(1, 1), chunk(3, 3)], "last_seq": 3},  # not tiling
        {"chunks": [chunk(1, 1)], "last_seq": 2},  # last_seq beyond the chunks
        {"chunks": [{**chunk(2, 1), "seq_end": 1}], "first_seq": 2, "last_seq": 1},  # end < seq
        {"chunks": [chunk(1, 1)], "schema": "v0"},
        {"chunks": []},
        {"chunks": [{"seq": 1}]},  # a chunk without camera, stream, t, rev, count
    ],
)
def test_both_receivers_refuse_a_bad_batch(bad: dict[str, Any]) -> None:
    doc = {"schema": "edge-agent/v1", "gateway": "gw", "first_seq": 1, "last_seq": 1, **bad}
    with pytest.raises((ValueError, KeyError)):
        _validate(doc)
    with pytest.raises((ValueError, msgspec.DecodeError)):
        decode_batch(json.dumps(doc).encode())
