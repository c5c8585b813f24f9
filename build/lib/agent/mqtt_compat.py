"""The one place that reaches inside aiomqtt: manual acks and the raw paho message (DUP flag).

aiomqtt 2.x neither exposes manual acknowledgement nor the DUP flag; the paho client it wraps
does. Both hooks must be installed before the connection is entered: a resumed session's
redeliveries arrive in the same read as the CONNACK, and paho acks them on its own unless manual
acks are already on. tests/test_mqtt_compat.py fails loudly if an upgrade breaks this.
"""

from __future__ import annotations

from collections.abc import Callable

import aiomqtt
import paho.mqtt.client as paho

RawHandler = Callable[[paho.MQTTMessage], None]


class IncompatibleClient(RuntimeError):
    """aiomqtt's internals changed; manual acks cannot be guaranteed."""


def _paho(client: aiomqtt.Client) -> paho.Client:
    inner = getattr(client, "_client", None)
    if not isinstance(inner, paho.Client) or not hasattr(inner, "manual_ack_set"):
        raise IncompatibleClient(
            "aiomqtt.Client no longer wraps a paho Client with manual_ack_set; "
            "edge-agent cannot hold acks until messages are durable with this aiomqtt version"
        )
    return inner


def install_raw_handler(client: aiomqtt.Client, handler: RawHandler) -> None:
    """Turn on manual acks and route every PUBLISH to `handler` (bypassing aiomqtt's queue)."""
    inner = _paho(client)
    inner.manual_ack_set(True)

    def on_message(_c: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        handler(message)

    inner.on_message = on_message


def send_ack(client: aiomqtt.Client, mid: int, qos: int) -> None:
    """Send the PUBACK for `mid` (on the event loop thread)."""
    _paho(client).ack(mid, qos)
