"""When the forwarder may probe the cloud during a backoff: only after an attempt that found no
connection at all (found by the adversary: after a TLS failure, probing pinned the backoff to
probe_interval_s)."""

from __future__ import annotations

import ssl

import httpx

from agent.forward.forwarder import _refused


def _chained(outer: Exception, inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except Exception as e:
        return e


def test_a_refused_or_unreachable_connect_allows_probing() -> None:
    assert _refused(_chained(httpx.ConnectError("refused"), ConnectionRefusedError(111, "x")))
    assert _refused(_chained(httpx.ConnectError("no route"), OSError(113, "no route")))


def test_a_connection_that_then_failed_does_not() -> None:
    assert not _refused(_chained(httpx.ConnectError("tls"), ssl.SSLError("handshake")))
    assert not _refused(_chained(httpx.ReadError("reset"), ConnectionResetError(104, "x")))
    assert not _refused(None)
