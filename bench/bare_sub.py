"""Baseline consumer: a bare aiomqtt subscriber that only counts messages.

Same session shape as the agent's MQTT side (MQTT v5, QoS 1 subscription, Receive Maximum 65535,
one aiomqtt client) but nothing behind it: aiomqtt acknowledges on receipt and each message is
only counted (`async for message in client.messages`, aiomqtt's documented way). It runs on
uvloop when installed, as the agent does. Prints "ready" once subscribed, then the running
count every 0.1 s, and the count once more on SIGTERM (then exits 0).

    python -m bench.bare_sub --port 1883 [--topic 'site/cam/+/+'] [--max-seconds 600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


async def run(port: int, topic: str, max_seconds: float) -> None:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped
    props.ReceiveMaximum = 65535
    count = 0
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=f"bench-bare-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5, clean_start=True, properties=props, keepalive=60,
    ) as client:  # fmt: skip
        await client.subscribe(topic, qos=1)
        print("ready", flush=True)

        async def consume() -> None:
            nonlocal count
            async for _ in client.messages:
                count += 1

        async def report() -> None:
            while True:
                await asyncio.sleep(0.1)
                print(count, flush=True)

        tasks = [asyncio.create_task(consume()), asyncio.create_task(report())]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_seconds):
                await stop.wait()
        for t in tasks:
            t.cancel()
        print(count, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare_sub")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic", default="site/cam/+/+")
    p.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args.port, args.topic, args.max_seconds))
    else:
        uvloop.run(run(args.port, args.topic, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
