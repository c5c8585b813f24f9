"""The test helpers themselves: wait_delivered must see a duplicate that arrives late."""

from __future__ import annotations

import threading
import time
import urllib.request

from agent.core.model import encode_batch, encode_chunk
from agent.windows.aggregate import Aggregator, StreamSpec
from devtools.procs import Receiver
from devtools.truth import Expected
from tests.helpers import wait_delivered

T = 1764126000


def post_chunk(receiver: Receiver, seq: int) -> None:
    """One chunk of one message for (cam-1, det, T), as the agent sends it."""
    agg = Aggregator(window_s=1, allowed_lateness_s=0, idle_close_s=1)
    agg.add("cam-1", "det", StreamSpec(), {}, T + 0.5, T + 0.5)
    (chunk,) = agg.close_all()
    body = encode_batch("gw-test", [(seq, seq, encode_chunk(chunk))], sent_at=time.time())
    req = urllib.request.Request(
        receiver.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def test_wait_delivered_waits_for_quiet_and_sees_a_late_duplicate(receiver: Receiver) -> None:
    expected = {("cam-1", "det", T): Expected(count=1)}
    post_chunk(receiver, 1)
    # The same message again, under a new seq, a second after the expected count was reached:
    # a redelivery counted twice. Comparing at the first moment the count matched misses it.
    late = threading.Timer(1.0, post_chunk, args=(receiver, 2))
    late.start()
    try:
        c = wait_delivered(receiver, expected, timeout_s=20, settle_s=2.0)
    finally:
        late.join()
    assert c.duplicated == 1, c
