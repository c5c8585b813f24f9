from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.timekeeping import BadTimestamp, parse_event_time

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
