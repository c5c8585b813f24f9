from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.model import OTHER, Chunk
from agent.core.reasons import Reject
from agent.windows.aggregate import Aggregator, StreamSpec

SPEC = StreamSpec(numeric=("conf",), categorical=("cls",), max_categories=4)
T0 = 1764126000


def make(**kw: Any) -> Aggregator:
    base: dict[str, Any] = {"window_s": 1, "allowed_lateness_s": 2.0, "idle_close_s": 5.0}
    base.update(kw)
    return Aggregator(**base)


def add(agg: Aggregator, t: float, recv: float, cam: str = "c1", **payload: Any) -> Any:
    return agg.add(cam, "det", SPEC, payload, t, recv)


def test_window_closes_when_camera_watermark_passes_end_plus_lateness() -> None:
    agg = make()
    add(agg, T0 + 0.2, T0 + 0.3, conf=0.5, cls="person")
    add(agg, T0 + 0.9, T0 + 1.0, conf=0.7, cls="car")
    add(agg, T0 + 2.9, T0 + 3.0)  # watermark 2.9 < 1 + 2
    assert agg.close_due(T0 + 3.0) == []
    add(agg, T0 + 3.0, T0 + 3.1)  # watermark reaches end (T0+1) + lateness (2)
    closed = agg.close_due(T0 + 3.1)
    assert [(c.t, c.count) for c in closed] == [(T0, 2)]
    c = closed[0]
    assert c.rev == 0
    assert c.num["conf"].n == 2 and c.num["conf"].sum == pytest.approx(1.2)
    assert c.num["conf"].last == 0.7
    assert c.cat["cls"] == {"person": 1, "car": 1}
    assert c.event_first == T0 + 0.2 and c.event_last == T0 + 0.9


def test_watermarks_are_per_camera() -> None:
    agg = make()
    add(agg, T0 + 0.5, T0 + 0.5, cam="slow")
    add(agg, T0 + 10, T0 + 10, cam="fast")
    assert agg.close_due(T0 + 1) == []  # a fast camera does not close a slow camera's windows


def test_camera_with_skewed_clock_closes_on_its_own_event_time() -> None:
    agg = make()
    behind = -300.0
    for i in range(5):
        add(agg, T0 + i + behind, T0 + i)
    closed = agg.close_due(T0 + 4)
    assert [c.t for c in closed] == [T0 + behind, T0 + 1 + behind]


def test_idle_camera_closes_on_gateway_time() -> None:
    agg = make()
    add(agg, T0 + 0.5, T0 + 0.5)
    assert agg.close_due(T0 + 5.4) == []
    closed = agg.close_due(T0 + 5.5)
    assert [c.t for c in closed] == [T0]
    assert agg.open_count == 0


def test_late_message_becomes_delta_with_increasing_rev() -> None:
    agg = make()
    add(agg, T0 + 0.5, T0 + 0.5)
    add(agg, T0 + 5, T0 + 5)
    assert [c.rev for c in agg.close_due(T0 + 5)] == [0]
    w = add(agg, T0 + 0.7, T0 + 5.1, conf=0.1)
    assert w.rev == 1
    add(agg, T0 + 0.8, T0 + 5.2)
    closed = agg.close_due(T0 + 5.2)
    assert [(c.t, c.rev, c.count) for c in closed] == [(T0, 1, 2)]
    add(agg, T0 + 0.9, T0 + 5.3)
    assert [(c.t, c.rev) for c in agg.close_due(T0 + 5.3)] == [(T0, 2)]
    assert agg.counters["late_deltas"] == 3


def test_late_policy_drop_returns_the_reason_for_the_caller_to_count() -> None:
    agg = make(late_policy="drop")
    add(agg, T0 + 0.5, T0 + 0.5)
    add(agg, T0 + 5, T0 + 5)
    agg.close_due(T0 + 5)
    assert add(agg, T0 + 0.7, T0 + 5.1) is Reject.late_dropped
    # Counted once, in Stats.rejects by the intake; not a second time here.
    assert "late_dropped" not in agg.counters


def test_categories_capped_with_overflow_counted() -> None:
    agg = make()
    for i in range(10):
        add(agg, T0 + 0.01 * i, T0 + 0.01 * i, cls=f"v{i}")
    (c,) = agg.close_all()
    assert len(c.cat["cls"]) == 5
    assert c.cat["cls"][OTHER] == 6
    assert sum(c.cat["cls"].values()) == 10


def test_bad_field_values_are_counted_not_aggregated() -> None:
    agg = make()
    add(agg, T0, T0, conf="high", cls={"a": 1})
    add(agg, T0, T0, conf=float("nan"), cls=True)
    (c,) = agg.close_all()
    assert c.count == 2
    assert "conf" not in c.num
    assert c.cat["cls"] == {"true": 1}
    assert agg.counters["bad_numeric_field"] == 2
    assert agg.counters["bad_categorical_field"] == 1


def test_marks_carry_revs_across_a_restart() -> None:
    agg = make()
    add(agg, T0 + 0.5, T0 + 0.5)
    add(agg, T0 + 5, T0 + 5)
    agg.close_due(T0 + 5)
    add(agg, T0 + 0.6, T0 + 5.1)
    agg.close_all()
    again = make()
    again.import_marks(agg.export_marks(), now=T0 + 6)
    w = add(again, T0 + 0.7, T0 + 6)
    assert w.rev == 2


def test_restore_reopens_saved_windows() -> None:
    agg = make()
    add(agg, T0 + 0.5, T0 + 0.5, conf=0.5, cls="a")
    saved = [Chunk.from_wire(w.to_wire()) for w in agg.open_windows()]
    again = make()
    assert again.restore(saved, now=T0 + 1) == 1
    add(again, T0 + 0.6, T0 + 1, conf=0.25, cls="a")
    (c,) = again.close_all()
    assert c.count == 2 and c.cat["cls"] == {"a": 2} and c.num["conf"].sum == 0.75


def test_restore_remembers_the_snapshot_keys_to_drop() -> None:
    """Each restored snapshot's key is kept on its window, so the commit of the window's chunk
    can drop every snapshot of it (one durable home per count, G9)."""
    agg = make()
    add(agg, T0 + 0.5, T0 + 0.5, conf=0.5, cls="a")
    add(agg, T0 + 1.5, T0 + 1.5, cam="c2", conf=0.5, cls="a")
    saved = [Chunk.from_wire(w.to_wire()) for w in agg.open_windows()]
    # Two snapshots of the same window (say rev 0 saved twice under another key): merged.
    twin = Chunk.from_wire(saved[0].to_wire())
    twin.rev = 1
    again = make()
    assert again.restore([*saved, twin], now=T0 + 2) == 2
    keys = {w.camera: w.saved_keys for w in again.open_windows()}
    assert keys["c1"] == [("c1", "det", T0, 0), ("c1", "det", T0, 1)]
    assert keys["c2"] == [("c2", "det", T0 + 1, 0)]
    assert all(w.saved_keys == [] for w in agg.open_windows())  # never saved: nothing to drop
    (c1,) = [w for w in again.close_all() if w.camera == "c1"]
    assert c1.count == 2


def test_idle_close_runs_on_the_monotonic_clock_not_the_wall_clock() -> None:
    """`mono` drives the idle timeout: a step of the wall clock (recv_t) neither closes an
    idle camera's windows early nor holds them open."""
    agg = make()
    mono0 = 1000.0
    w = agg.add("c1", "det", SPEC, {}, T0 + 0.5, T0 + 0.5, mono=mono0)
    assert not isinstance(w, str)
    # The wall clock jumps a day ahead: the chunk is stamped with it, the timer does not move.
    agg.add("c1", "det", SPEC, {}, T0 + 0.6, T0 + 86400, mono=mono0 + 0.1)
    assert agg.close_due(mono0 + 5.0) == []
    closed = agg.close_due(mono0 + 5.2)
    assert [c.t for c in closed] == [T0] and closed[0].count == 2
    assert agg.open_count == 0


# -- property: merging every rev of a window equals aggregating its messages at once ----------

CLASSES = ["person", "car", "dog"]  # below the cap, so category counts are exact
message = st.tuples(
    st.sampled_from(["c1", "c2", "c3"]),
    st.floats(min_value=0, max_value=20, allow_nan=False),  # event offset, s
    st.floats(min_value=0, max_value=30, allow_nan=False),  # arrival delay, s
    st.one_of(st.none(), st.floats(min_value=-100, max_value=100, allow_nan=False)),
    st.one_of(st.none(), st.sampled_from(CLASSES)),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(message, max_size=60),
    st.integers(min_value=1, max_value=3),
    st.floats(min_value=0, max_value=3),
    st.floats(min_value=0.5, max_value=10),
    st.lists(st.floats(min_value=0, max_value=40), max_size=5),
)
def test_merged_revs_equal_all_at_once(
    msgs: list[tuple[str, float, float, float | None, str | None]],
    window_s: int,
    lateness: float,
    idle: float,
    extra_checkpoints: list[float],
) -> None:
    agg = make(window_s=window_s, allowed_lateness_s=lateness, idle_close_s=idle)
    arrivals = sorted(
        ((T0 + off + delay, cam, T0 + off, conf, cls) for cam, off, delay, conf, cls in msgs),
        key=lambda a: a[0],
    )
    checkpoints = sorted(T0 + x for x in extra_checkpoints)
    emitted: list[Chunk] = []
    for recv, cam, ev, conf, cls in arrivals:
        while checkpoints and checkpoints[0] <= recv:
            emitted += agg.close_due(checkpoints.pop(0))
        payload: dict[str, Any] = {}
        if conf is not None:
            payload["conf"] = conf
        if cls is not None:
            payload["cls"] = cls
        w = agg.add(cam, "det", SPEC, payload, ev, recv)
        assert not isinstance(w, str)
    emitted += agg.close_all()

    merged: dict[tuple[str, int], Chunk] = {}
    revs: dict[tuple[str, int], list[int]] = defaultdict(list)
    for c in emitted:
        key = (c.camera, c.t)
        revs[key].append(c.rev)
        if key in merged:
            merged[key].merge(c)
        else:
            merged[key] = c
    for key, rs in revs.items():
        assert sorted(rs) == list(range(min(rs), min(rs) + len(rs))), f"revs of {key}: {rs}"
        assert len(set(rs)) == len(rs)

    expected: dict[tuple[str, int], list[tuple[float, float | None, str | None]]] = defaultdict(
        list
    )
    for cam, off, _delay, conf, cls in msgs:
        ev = T0 + off
        expected[(cam, int(ev // window_s) * window_s)].append((ev, conf, cls))
    assert merged.keys() == expected.keys()
    for key, items in expected.items():
        c = merged[key]
        assert c.count == len(items)
        confs = [(ev, v) for ev, v, _ in items if v is not None]
        if confs:
            s = c.num["conf"]
            assert s.n == len(confs)
            assert math.isclose(s.sum, sum(v for _, v in confs), rel_tol=1e-9, abs_tol=1e-9)
            assert s.min == min(v for _, v in confs) and s.max == max(v for _, v in confs)
            assert s.last == max(confs)[1]
        else:
            assert "conf" not in c.num
        cats: dict[str, int] = defaultdict(int)
        for _, _, cls in items:
            if cls is not None:
                cats[cls] += 1
        assert c.cat.get("cls", {}) == dict(cats)
        assert c.event_first == min(ev for ev, _, _ in items)
        assert c.event_last == max(ev for ev, _, _ in items)


def test_caps_reject_new_cameras_streams_and_windows_beyond_them() -> None:
    agg = make(max_cameras=2, max_streams_per_camera=2, max_open_windows=3)
    assert not isinstance(agg.add("a", "s1", SPEC, {}, T0, T0), str)
    assert not isinstance(agg.add("b", "s1", SPEC, {}, T0, T0), str)
    assert agg.add("c", "s1", SPEC, {}, T0, T0) == "too_many_cameras"
    assert not isinstance(agg.add("a", "s2", SPEC, {}, T0, T0), str)
    assert agg.add("a", "s3", SPEC, {}, T0, T0) == "too_many_streams"
    assert agg.add("b", "s1", SPEC, {}, T0 + 1, T0 + 1) == "too_many_open_windows"
    assert not isinstance(agg.add("a", "s1", SPEC, {}, T0, T0), str)  # existing windows still count


def test_an_id_flood_does_not_lock_honest_cameras_or_streams_out() -> None:
    """At the caps, ids that went silent with nothing open are forgotten (after
    forget_after_s for cameras); the honest camera or stream gets in, not an hour later."""
    agg = make(max_cameras=3, max_streams_per_camera=2)
    forgotten: list[str] = []
    agg.on_forget = forgotten.append  # the camera clock estimates go with them
    for i in range(3):  # a flood of one-message ids fills the camera cap
        assert not isinstance(agg.add(f"flood-{i}", "s", SPEC, {}, T0, T0), str)
    assert agg.add("honest", "s", SPEC, {}, T0 + 1, T0 + 1) == "too_many_cameras"
    agg.close_due(T0 + 30)  # the flood's windows close (idle); the ids stay silent
    assert agg.add("honest", "s", SPEC, {}, T0 + 30, T0 + 30) == "too_many_cameras"
    later = T0 + 1 + agg.forget_after_s + 1
    assert not isinstance(agg.add("honest", "s", SPEC, {}, later, later), str)
    assert agg.counters["cameras_forgotten_at_cap"] == 1
    assert sorted(forgotten) == ["flood-0", "flood-1", "flood-2"]
    # Streams: the cap counts streams with open windows.
    assert not isinstance(agg.add("honest", "x1", SPEC, {}, later, later), str)
    assert agg.add("honest", "x2", SPEC, {}, later, later) == "too_many_streams"
    agg.close_due(later + 30)
    assert not isinstance(agg.add("honest", "x2", SPEC, {}, later + 30, later + 30), str)
