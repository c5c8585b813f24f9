from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.errors import BadTimestamp
from agent.intake.timekeeping import parse_event_time

T = 1764126000.25  # 2025-11-26T03:00:00.25Z


@pytest.mark.parametrize(
    ("value", "unit"),
    [
        (T, "s"), (T, "auto"),
        (int(T * 1e3), "ms"), (int(T * 1e3), "auto"),
        (int(T * 1e6), "us"), (int(T * 1e6), "auto"),
        (int(T * 1e9), "ns"), (int(T * 1e9), "auto"),
        ("2025-11-26T03:00:00.25Z", "rfc3339"), ("2025-11-26T03:00:00.25Z", "auto"),
        ("2025-11-26T04:00:00.25+01:00", "auto"),
    ],
)  # fmt: skip
def test_units(value: object, unit: str) -> None:
    assert parse_event_time(value, unit) == pytest.approx(T, abs=1e-6)


@pytest.mark.parametrize(
    ("value", "unit"),
    [
        ("yesterday", "auto"), ("2025-11-26T03:00:00", "rfc3339"), (True, "auto"), (None, "s"),
        (float("nan"), "auto"), (float("inf"), "s"), (-5, "s"), ([1], "auto"), (T, "rfc3339"),
        ("9" * 100, "auto"),
    ],
)  # fmt: skip
def test_bad_values_raise_bad_timestamp(value: object, unit: str) -> None:
    with pytest.raises(BadTimestamp):
        parse_event_time(value, unit)


@given(st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=50), st.none(),
                 st.booleans(), st.lists(st.integers(), max_size=2)),
       st.sampled_from(["auto", "s", "ms", "us", "ns", "rfc3339"]))  # fmt: skip
def test_never_raises_anything_but_bad_timestamp(value: object, unit: str) -> None:
    try:
        t = parse_event_time(value, unit)
    except BadTimestamp:
        return
    assert 0 <= t < 1e10 or isinstance(value, str)


@given(st.floats(min_value=1e8, max_value=4e9))
def test_auto_tells_units_apart_for_any_date_after_1973(seconds: float) -> None:
    for scale in (1, 1e3, 1e6, 1e9):
        assert parse_event_time(seconds * scale, "auto") == pytest.approx(seconds, rel=1e-9)


# -- per-camera clocks: pure, time passed in ------------------------------------------------

import random  # noqa: E402

from agent.intake.timekeeping import CameraClocks, ClockPolicy  # noqa: E402


def feed(
    clocks: CameraClocks,
    camera: str,
    true_start: float,
    n: int,
    clock: object,
    rate: float = 10.0,
    seed: int = 1,
) -> list[tuple[float, float, tuple[str, ...] | None, float]]:
    """n messages at `rate`/s; `clock(true_t)` is what the camera stamps. Returns
    (true time, receive time, flags or None, aggregated time)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        true_t = true_start + i / rate
        recv = true_t + rng.uniform(0.005, 0.4)  # network and broker delay
        stamped = clocks.stamp(camera, clock(true_t), recv)  # type: ignore[operator]
        out.append(
            (
                true_t,
                recv,
                None if stamped is None else stamped[1],
                float("nan") if stamped is None else stamped[0],
            )
        )
    return out  # fmt: skip


def test_offset_ahead_is_estimated_and_flagged() -> None:
    clocks = CameraClocks(ClockPolicy(skew_policy="flag", max_skew_s=30))
    out = feed(clocks, "c", T, 300, lambda t: t + 37.0)
    c = clocks.get("c")
    assert c is not None and c.skew_s == pytest.approx(37.0, abs=0.05)
    assert c.suspect and out[-1][2] == ("clock_suspect",)
    assert out[-1][3] == pytest.approx(out[-1][0] + 37.0)  # flag keeps camera time
    assert any("exceeds max_skew_s" in n for n in clocks.take_notices())


def test_behind_five_minutes_restamped_to_true_time() -> None:
    clocks = CameraClocks(ClockPolicy(skew_policy="restamp"))
    out = feed(clocks, "c", T, 300, lambda t: t - 300.0)
    true_t, recv, flags, t = out[-1]
    assert flags == ("restamped",)
    assert true_t <= t <= recv  # shifted by the estimate: within the network delay of truth
    assert clocks.counters["clock_restamped"] > 250


def test_gateway_policy_uses_receive_time_while_the_clock_is_bad() -> None:
    clocks = CameraClocks(ClockPolicy(skew_policy="gateway"))
    out = feed(clocks, "c", T, 100, lambda t: t - 300.0)
    _, recv, flags, t = out[-1]
    assert flags == ("time_from_gateway",) and t == recv


def test_punctual_camera_is_untouched() -> None:
    clocks = CameraClocks(ClockPolicy(skew_policy="restamp"))
    out = feed(clocks, "c", T, 200, lambda t: t)
    assert all(flags == () for _, _, flags, _ in out)
    c = clocks.get("c")
    assert c is not None and c.skew_s is not None and -0.4 <= c.skew_s <= 0


def test_drift_of_one_second_per_minute_is_tracked() -> None:
    clocks = CameraClocks(ClockPolicy())
    feed(clocks, "c", T, 6000, lambda t: t + (t - T) / 60.0)  # 10 minutes
    c = clocks.get("c")
    assert c is not None and c.skew_s == pytest.approx(10.0, abs=0.6)


def test_reset_to_1970_is_caught_at_once_and_recovers() -> None:
    clocks = CameraClocks(ClockPolicy(skew_policy="restamp"))
    feed(clocks, "c", T, 100, lambda t: t)
    reset = feed(clocks, "c", T + 10, 50, lambda t: t - T - 10 + 5.0)  # reboot: 1970 + 5 s
    # Every message after the reset is counted, at (about) its true time, never in 1970.
    assert all(flags is not None and "bad_time" in flags for _, _, flags, _ in reset[:2])
    assert all(flags == ("restamped",) for _, _, flags, _ in reset[2:])  # the step is confirmed
    assert all(abs(t - true_t) < 1.0 for true_t, _, _, t in reset)
    assert clocks.counters["clock_jumps"] == 1
    fixed = feed(clocks, "c", T + 15, 50, lambda t: t)  # NTP comes back
    assert clocks.counters["clock_jumps"] == 2
    assert fixed[-1][2] == ()
    c = clocks.get("c")
    assert c is not None and not c.suspect
    notes = clocks.take_notices()
    assert any("clock stepped" in n for n in notes) and any("back within" in n for n in notes)


def test_milliseconds_sent_as_seconds_are_restamped_immediately() -> None:
    clocks = CameraClocks(ClockPolicy(skew_policy="flag"))
    feed(clocks, "c", T, 100, lambda t: t)
    wrong = feed(clocks, "c", T + 10, 5, lambda t: t * 1000.0)  # the year 57,000
    assert all(flags is not None and "bad_time" in flags for _, _, flags, _ in wrong)
    assert all(t == recv for _, recv, _, t in wrong)


def test_a_late_message_keeps_its_time_and_does_not_move_the_estimate() -> None:
    clocks = CameraClocks(ClockPolicy(skew_policy="restamp"))
    feed(clocks, "c", T, 100, lambda t: t)
    stamped = clocks.stamp("c", T + 10 - 120.0, T + 10)  # buffered two minutes on the camera
    assert stamped == (T + 10 - 120.0, ())
    c = clocks.get("c")
    assert c is not None and c.skew_s is not None and abs(c.skew_s) < 0.5


def test_bad_time_drop_policy_drops_and_leaves_the_count_to_the_caller() -> None:
    clocks = CameraClocks(ClockPolicy(bad_time_policy="drop", max_future_s=60))
    assert clocks.stamp("c", T + 3600, T) is None
    # Counted once, as the reject bad_time_dropped in Stats.rejects (tests/intake/test_ingest.py).
    assert "bad_time_dropped" not in clocks.counters


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=300))
def test_incremental_minimum_equals_the_windowed_minimum(samples: list[float]) -> None:
    from agent.intake.timekeeping import CameraClock

    c = CameraClock()
    for d in samples:
        c.observe(d, jump_s=1e9)  # no steps: every sample enters the window
    assert c.offset == min(samples[-CameraClock.WINDOW :])


# -- the gateway's own clock wrong (issue #24, G13) -------------------------------------------

YEAR = 365 * 86400.0


def site(
    clocks: CameraClocks,
    start: float,
    seconds: float,
    gateway: object,
    cameras: int = 10,
    camera_clock: object = None,
    rate: float = 2.0,
) -> list[tuple[str, float, float, tuple[str, ...] | None]]:
    """`cameras` cameras on true time (camera-000 on `camera_clock(t)` if given), each sending
    `rate`/s for `seconds`, received on a gateway whose wall clock reads `gateway(true_t)`.
    Returns (camera, true time, aggregated time, flags) per message, in receive order."""
    rng = random.Random(7)
    out = []
    for k in range(int(seconds * rate)):
        for c in range(cameras):
            true_t = start + k / rate + c / (rate * cameras)
            event = camera_clock(true_t) if (c == 0 and camera_clock) else true_t  # type: ignore[operator]
            recv = gateway(true_t + rng.uniform(0.005, 0.3))  # type: ignore[operator]
            stamped = clocks.stamp(f"cam-{c:03d}", event, recv)
            out.append((f"cam-{c:03d}", true_t, *(stamped or (float("nan"), None))))
    return out  # fmt: skip


@pytest.mark.parametrize("step", [YEAR, -26 * YEAR])  # into 2027, back to 2000
def test_a_gateway_clock_step_moves_no_camera_that_agrees_with_the_others(step: float) -> None:
    clocks = CameraClocks(ClockPolicy())  # the defaults: flag, max_skew_s 30, bad time restamped
    before = site(clocks, T, 30, lambda t: t)
    # The step, as the monotonic clock proves it (StepWatch in the intake).
    clocks.gateway_stepped(step)
    after = site(clocks, T + 30, 60, lambda t: t + step)
    for _, true_t, t, flags in before + after:
        assert flags == () and abs(t - true_t) < 1e-9, (true_t, t, flags)
    assert clocks.gateway_offset == pytest.approx(step, abs=1) and not clocks.gateway_trusted
    assert clocks.consensus == (10, 10)
    assert any("gateway clock off by" in n for n in clocks.take_notices())
    assert clocks.counters["bad_time_restamped"] == 0 and clocks.counters["clock_restamped"] == 0

    # NTP puts it right: trusted again, and still nothing moved.
    clocks.gateway_stepped(-step)
    again = site(clocks, T + 90, 10, lambda t: t)
    assert all(flags == () and t == true_t for _, true_t, t, flags in again)
    assert clocks.gateway_trusted
    assert any("agrees with the cameras again" in n for n in clocks.take_notices())


def test_a_gateway_wrong_from_the_start_is_outvoted_after_its_first_cameras() -> None:
    """No step to see (the agent started after the RTC reset): the consensus forms as soon as
    three cameras have spoken; only their first messages were judged on the gateway's word."""
    clocks = CameraClocks(ClockPolicy())
    out = site(clocks, T, 60, lambda t: t - 26 * YEAR)
    moved = [(cam, true_t, t) for cam, true_t, t, _ in out if abs(t - true_t) > 1]
    assert len(moved) <= 2, moved[:5]
    assert clocks.gateway_offset == pytest.approx(-26 * YEAR, abs=1)


@pytest.mark.parametrize("policy", ["flag", "restamp", "gateway"])
def test_a_wrong_camera_under_a_wrong_gateway_is_judged_by_the_other_cameras(policy: str) -> None:
    """The gateway off by a year and one camera in 1970: the camera is the suspect, and what
    is restamped goes to the cameras' time, never to the gateway's."""
    clocks = CameraClocks(ClockPolicy(skew_policy=policy))  # type: ignore[arg-type]
    site(clocks, T, 20, lambda t: t)
    clocks.gateway_stepped(YEAR)
    out = site(clocks, T + 20, 40, lambda t: t + YEAR, camera_clock=lambda t: t - 1.7e9)
    bad = [(true_t, t, flags) for cam, true_t, t, flags in out if cam == "cam-000"]
    good = [(true_t, t, flags) for cam, true_t, t, flags in out if cam != "cam-000"]
    assert all(flags == () and t == true_t for true_t, t, flags in good)
    assert all(abs(t - true_t) < 5 for true_t, t, _ in bad), bad[:3]  # true time, not 2027
    assert all(flags for _, _, flags in bad)
    camera = clocks.get("cam-000")
    assert camera is not None and camera.suspect


def test_no_consensus_without_a_majority_or_with_fewer_than_three_cameras() -> None:
    few = CameraClocks(ClockPolicy())
    site(few, T, 20, lambda t: t + YEAR, cameras=2)
    assert few.gateway_trusted
    split = CameraClocks(ClockPolicy())
    for c, skew in enumerate([0.0, 0.0, 500.0, 1000.0, 5000.0]):  # no majority agrees
        feed(split, f"cam-{c}", T, 50, lambda t, s=skew: t - s)
    assert split.gateway_trusted


def test_cameras_that_all_came_back_in_1970_do_not_outvote_a_right_gateway() -> None:
    """A site power cut resets every camera without an RTC to 1970 at once: they agree with
    each other, and they are wrong. A clock before 2024 is never the right one."""
    clocks = CameraClocks(ClockPolicy())
    out = site(clocks, T, 30, lambda t: t, cameras=10)
    boot = T + 30
    after = []
    rng = random.Random(3)
    for k in range(60):
        for c in range(10):
            true_t = boot + k / 2 + c / 20
            camera_t = (true_t - boot) + 40 + c  # seconds since their own boot, in 1970
            stamped = clocks.stamp(f"cam-{c:03d}", camera_t, true_t + rng.uniform(0.005, 0.3))
            assert stamped is not None
            after.append((true_t, *stamped))
    assert clocks.gateway_trusted
    assert all(flags == () for _, _, _, flags in out)
    # Every 1970 message lands on the gateway's (right) time, flagged.
    assert all(abs(t - true_t) < 1 and "bad_time" in flags for true_t, t, flags in after)


@pytest.mark.parametrize("cameras", [1, 2])
@pytest.mark.parametrize("step", [-3600.0, YEAR, -26 * YEAR])
def test_a_step_the_agent_sees_moves_nothing_with_few_cameras(cameras: int, step: float) -> None:
    """With one or two cameras there is no consensus to form, but the monotonic clock proved
    the step: the cameras' data stays where it was (an adversary's 2 cameras lost an hour)."""
    clocks = CameraClocks(ClockPolicy())
    before = site(clocks, T, 20, lambda t: t, cameras=cameras)
    clocks.gateway_stepped(step)
    after = site(clocks, T + 20, 40, lambda t: t + step, cameras=cameras)
    assert all(flags == () and abs(t - true_t) < 1e-6 for _, true_t, t, flags in before + after)


def test_cameras_that_disagree_keep_their_places_across_a_step() -> None:
    """Five cameras 0, 100, ... 400 s apart (no majority), the gateway steps back an hour:
    each camera keeps the time it had before the step."""
    clocks = CameraClocks(ClockPolicy(max_skew_s=30))

    def run(start: float, seconds: float, gateway: object) -> dict[int, set[float]]:
        seen: dict[int, set[float]] = {}
        rng = random.Random(5)
        for k in range(int(seconds * 2)):
            for c in range(5):
                true_t = start + k / 2 + c / 10
                recv = gateway(true_t + rng.uniform(0.005, 0.3))  # type: ignore[operator]
                stamped = clocks.stamp(f"cam-{c}", true_t - 100 * c, recv)
                assert stamped is not None
                seen.setdefault(c, set()).add(round(stamped[0] - (true_t - 100 * c), 6))
        return seen

    before = run(T, 20, lambda t: t)
    clocks.gateway_stepped(-3600.0)
    after = run(T + 20, 40, lambda t: t - 3600.0)
    assert after == before  # the same shift (none, or a restamp by the same estimate) per camera
