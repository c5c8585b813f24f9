"""The hostile payload catalogue ("pills"): every known message kind that hurt, or could hurt, the
agent, with what must become of it. One catalogue for two users: bench/hostile_soak.py mixes
the pills into honest traffic for minutes with real processes; tests/intake/test_hostile_
payloads.py feeds each one through the ingest path in process, and a few to a real agent.

Outcomes: "reject:<reason>" (rejected and acked, counted under that reason), "counted" (counted
under the pill's camera id, with `side` counters of the aggregate section of /status raised per
message), "flood" (a new camera id each time: counted, or rejected as too_many_cameras at the
cap), "broker_drops" (far over mqtt.max_payload_bytes: the broker drops it for the agent, as the
agent's Maximum Packet Size asks; in process the agent rejects it as oversized).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_PAYLOAD = 64 * 1024  # mqtt.max_payload_bytes (the default)
MiB = 1024 * 1024
BIG_INT = b"1" + b"0" * 400  # 401 digits: msgspec yields an int that float() cannot take
NUMERIC = ("conf", "level", "temp_c", "fps")
CATEGORICAL = ("cls", "zone", "status")
# The streams the pills are written for ([[streams]] of the agent's config).
STREAMS: list[dict[str, Any]] = [
    {"topic": "site/cam/{camera}/{stream}", "numeric": NUMERIC, "categorical": CATEGORICAL},
    {"topic": "site/secs/{camera}/{stream}", "time_unit": "s", "numeric": NUMERIC,
     "categorical": CATEGORICAL},
]  # fmt: skip
# Topics with invalid UTF-8 (paho cannot publish them; bench/hostile_soak.py sends them raw).
RAW_TOPICS = (b"site/cam/\xff\xfe/detections", b"site/cam/evil-\xc3\x28/detections",
              b"site/cam/evil-\xed\xa0\x80/detections")  # fmt: skip
SIDE_COUNTERS = ("bad_numeric_field", "bad_categorical_field", "bad_time_restamped",
                 "bad_timestamp_used_gateway_time")  # fmt: skip


@dataclass(frozen=True)
class Pill:
    """One hostile message kind: its topic and payload (given the time), what must happen."""

    name: str
    weight: float  # relative share of the hostile rate
    topic: Callable[[int], str]  # n (the pill's running number) -> topic
    payload: Callable[[float], bytes]  # wall time -> payload
    outcome: str
    side: dict[str, int] = field(default_factory=dict)  # counted: {counter: per message}

    @property
    def camera(self) -> str:
        """The camera id a counted pill is counted under."""
        return self.topic(0).split("/")[2]


def _ts(t: float) -> bytes:
    return f"{t:.3f}".encode()


def _pad_to(t: float, size: int) -> bytes:
    """A valid JSON object of exactly `size` bytes: {"ts": ..., "pad": "xxxx..."}."""
    head = b'{"ts": ' + _ts(t) + b', "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def _cam(camera: str, stream: str = "detections") -> Callable[[int], str]:
    return lambda _n: f"site/cam/{camera}/{stream}"


def _honest(t: float) -> bytes:
    return b'{"ts": ' + _ts(t) + b', "cls": "car", "conf": 0.5}'


_REJ = _cam("evil-rej")
_BAD_STREAMS = ["det ections", "y" * 65, "str\u00e8am"]
_BAD_IDS = ["kamera-\u00fc", "a b", "x" * 65, "", "cam$1", "caf\u00e9", "evil\u200bzw"]
_MALFORMED = "reject:malformed_json"

PILLS: tuple[Pill, ...] = (
    # malformed JSON, one way or another
    Pill("utf8_in_string", 10, _REJ, lambda _t: b'{"cls":"\xff"}', _MALFORMED),
    Pill("utf8_in_string_2", 5, _REJ,
         lambda t: b'{"ts": ' + _ts(t) + b', "cls": "per\xc3\x28son", "conf": 0.5}', _MALFORMED),
    Pill("float_1e400", 10, _REJ, lambda _t: b'{"conf": 1e400}', _MALFORMED),
    Pill("int_5000_digits", 3, _REJ, lambda _t: b'{"conf": ' + b"7" * 5000 + b"}", _MALFORMED),
    Pill("truncated_json", 5, _REJ, lambda t: b'{"ts": ' + _ts(t) + b', "cls": "per', _MALFORMED),
    Pill("not_json", 3, _REJ, lambda _t: b"hello camera", _MALFORMED),
    Pill("empty_payload", 3, _REJ, lambda _t: b"", _MALFORMED),
    Pill("trailing_garbage", 3, _REJ, lambda _t: b'{"a": 1}}', _MALFORMED),
    Pill("nan_literal", 3, _REJ, lambda _t: b'{"conf": NaN}', _MALFORMED),
    # structure (valid JSON nested deeper than msgspec goes is too deep too, since d536106)
    Pill("deep_array_30000", 1, _REJ, lambda _t: b"[" * 30000 + b"]" * 30000, "reject:too_deep"),
    Pill("deep_object_10000", 1, _REJ, lambda _t: b'{"a":' * 10000 + b"1" + b"}" * 10000,
         "reject:too_deep"),
    Pill("deep_object_20", 5, _REJ, lambda _t: b'{"a":' * 20 + b"1" + b"}" * 20, "reject:too_deep"),
    Pill("deep_list_in_field_12", 5, _REJ,
         lambda t: b'{"ts": ' + _ts(t) + b', "x": ' + b"[" * 12 + b"]" * 12 + b"}",
         "reject:too_deep"),
    Pill("too_many_fields_300", 3, _REJ,
         lambda _t: ("{" + ",".join(f'"f{i}":{i}' for i in range(300)) + "}").encode(),
         "reject:too_many_fields"),
    Pill("non_object_list", 3, _REJ, lambda _t: b"[1, 2, 3]", "reject:not_an_object"),
    Pill("non_object_string", 3, _REJ, lambda _t: b'"a string"', "reject:not_an_object"),
    Pill("non_object_number", 3, _REJ, lambda _t: b"42", "reject:not_an_object"),
    Pill("non_object_null", 3, _REJ, lambda _t: b"null", "reject:not_an_object"),
    Pill("non_object_bool", 3, _REJ, lambda _t: b"true", "reject:not_an_object"),
    # size
    Pill("oversized_just_over", 3, _REJ, lambda t: _pad_to(t, MAX_PAYLOAD + 512),
         "reject:oversized"),
    Pill("oversized_far_over_1MiB", 0.5, _REJ, lambda t: _pad_to(t, MiB + 4096), "broker_drops"),
    # ids
    Pill("bad_camera_id", 7, lambda n: f"site/cam/{_BAD_IDS[n % len(_BAD_IDS)]}/detections",
         _honest, "reject:bad_camera_id"),
    Pill("bad_stream_id", 3, lambda n: f"site/cam/evil-ok/{_BAD_STREAMS[n % 3]}", _honest,
         "reject:bad_stream_id"),
    # counted, with a refused value or a bad time
    Pill("int_400_digits_numeric", 8, _cam("evil-bignum"),
         lambda t: b'{"ts": ' + _ts(t) + b', "conf": ' + BIG_INT + b', "level": 0.5}',
         "counted", {"bad_numeric_field": 1}),
    Pill("int_400_digits_ts", 8, _cam("evil-bigts"),
         lambda _t: b'{"ts": ' + BIG_INT + b', "conf": 0.5}',
         "counted", {"bad_timestamp_used_gateway_time": 1}),
    Pill("int_400_digits_category", 8, _cam("evil-bigcat"),
         lambda t: b'{"ts": ' + _ts(t) + b', "cls": ' + BIG_INT + b"}",
         "counted", {"bad_categorical_field": 1}),
    Pill("float_1e200", 8, _cam("evil-1e200"),
         lambda t: b'{"ts": ' + _ts(t) + b', "conf": 1e200, "level": -1e200}',
         "counted", {"bad_numeric_field": 2}),
    Pill("ts_1970", 8, _cam("evil-1970"),
         lambda t: b'{"ts": ' + _ts(5.0 + t % 1000) + b', "conf": 0.5}',
         "counted", {"bad_time_restamped": 1}),
    Pill("ts_far_future_2100", 8, _cam("evil-future"),
         lambda t: b'{"ts": ' + _ts(4102444800.0 + t % 1000) + b', "conf": 0.5}',
         "counted", {"bad_time_restamped": 1}),
    Pill("ms_where_s_configured", 8, lambda _n: "site/secs/evil-msts/detections",
         lambda t: b'{"ts": ' + str(int(t * 1000)).encode() + b', "conf": 0.5}',
         "counted", {"bad_timestamp_used_gateway_time": 1}),
    Pill("heartbeat_identical_no_ts", 15, _cam("evil-heartbeat", "health"),
         lambda _t: b'{"status": "ok", "fps": 25.0}', "counted"),
    # the camera cap
    Pill("new_camera_id_flood", 60, lambda n: f"site/cam/flood-{n:07d}/detections", _honest,
         "flood"),
)  # fmt: skip
BY_NAME = {p.name: p for p in PILLS}
